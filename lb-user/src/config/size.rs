//! Byte sizes written as `"8MiB"`, `"512KiB"` or `"65536"`: `send_buffer`
//! and `splice_queue_limit`.

use toml::Spanned;

use super::error::{ConfigError, Locator};

/// Default `send_buffer`: see the config reference in the README.
pub const DEFAULT_SEND_BUFFER: u32 = 8 << 20;
/// Default `splice_queue_limit`: off (see the config reference in the README).
pub const DEFAULT_SPLICE_QUEUE_LIMIT: u64 = 0;

/// `send_buffer` in bytes; 0 ("0"): leave the kernel's autotuning alone.
/// At most 512MiB: the kernel doubles it into an int.
pub fn send_buffer(loc: &Locator<'_>, v: &Option<Spanned<String>>) -> Result<u32, ConfigError> {
    let bytes = size(loc, "send_buffer", v, DEFAULT_SEND_BUFFER.into(), (64 << 10, 512 << 20), ("64KiB", "512MiB"))?;
    Ok(bytes as u32)
}

/// `splice_queue_limit` in bytes; 0 ("0"): no limit.
pub fn splice_queue_limit(loc: &Locator<'_>, v: &Option<Spanned<String>>) -> Result<u64, ConfigError> {
    size(loc, "splice_queue_limit", v, DEFAULT_SPLICE_QUEUE_LIMIT, (1 << 20, 64 << 30), ("1MiB", "64GiB"))
}

/// `key`'s size: `default` when unset, else 0 (off) or within `range`
/// (written as `names` in the error).
fn size(
    loc: &Locator<'_>,
    key: &str,
    v: &Option<Spanned<String>>,
    default: u64,
    range: (u64, u64),
    names: (&str, &str),
) -> Result<u64, ConfigError> {
    let Some(v) = v else { return Ok(default) };
    let text = v.get_ref().trim();
    let bytes = parse(text).ok_or_else(|| {
        loc.at(v, format!("{key} = \"{text}\": expected a size such as \"8MiB\", \"512KiB\" or \"0\" (off)"))
    })?;
    if bytes != 0 && !(range.0..=range.1).contains(&bytes) {
        return Err(loc.at(v, format!("{key} = \"{text}\": must be 0 (off) or between {} and {}", names.0, names.1)));
    }
    Ok(bytes)
}

fn parse(text: &str) -> Option<u64> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return None,
    };
    num.parse::<u64>().ok()?.checked_mul(scale)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn sizes() {
        assert_eq!(parse("8MiB"), Some(8 << 20));
        assert_eq!(parse("512 KiB"), Some(512 << 10));
        assert_eq!(parse("65536"), Some(65536));
        assert_eq!(parse("0"), Some(0));
        for bad in ["", "8mb", "MiB", "-1", "1.5MiB", "99999999999999999999GiB"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
