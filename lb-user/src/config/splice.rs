//! The `splice` keys: which frontends join their connections on the
//! packet plane.

use toml::Spanned;

use super::{ConfigError, Splice, error::Locator, raw::RawConfig};

/// Whether each frontend joins its connections on the packet plane (its
/// own `splice`, or the top-level default); unknown values are refused by
/// [`parse`].
fn joins(raw: &RawConfig) -> impl Iterator<Item = bool> + '_ {
    let default = raw.splice.as_ref().is_some_and(|s| s.get_ref() == "packet");
    raw.frontend.iter().map(move |f| f.splice.as_ref().map_or(default, |s| s.get_ref() == "packet"))
}

/// Whether a frontend joins on the packet plane.
pub(super) fn any_packet(raw: &RawConfig) -> bool {
    joins(raw).any(|j| j)
}

/// Whether every frontend joins on the packet plane.
pub(super) fn all_packet(raw: &RawConfig) -> bool {
    joins(raw).all(|j| j)
}

/// A `splice` value (`key` names it in the error).
pub(super) fn parse(loc: &Locator<'_>, key: &str, v: &Spanned<String>) -> Result<Splice, ConfigError> {
    match v.get_ref().as_str() {
        "sockmap" => Ok(Splice::Sockmap),
        "packet" => Ok(Splice::Packet),
        other => Err(loc.at(v, format!("{key} = \"{other}\": must be \"packet\" or \"sockmap\""))),
    }
}
