//! Byte sizes written as `"8MiB"`, `"512KiB"` or `"65536"`: `send_buffer`,
//! `splice_queue_limit` and `kernel_memory`.

use toml::Spanned;

use super::error::{ConfigError, Locator};

/// Default `send_buffer`: see the config reference in the README.
pub const DEFAULT_SEND_BUFFER: u32 = 8 << 20;
/// The default `splice_queue_limit` is this share of `kernel_memory`: a
/// connection may queue a quarter of what the maps may take before it is
/// reset (see the config reference in the README).
pub const SPLICE_QUEUE_SHARE: u64 = 4;

/// `send_buffer` in bytes; 0 ("0"): leave the kernel's autotuning alone.
/// At most 512MiB: the kernel doubles it into an int.
pub fn send_buffer(loc: &Locator<'_>, v: &Option<Spanned<String>>) -> Result<u32, ConfigError> {
    let range = Range { off: true, min: (64 << 10, "64KiB"), max: (512 << 20, "512MiB") };
    let bytes = size(loc, "send_buffer", v, DEFAULT_SEND_BUFFER.into(), range)?;
    Ok(bytes as u32)
}

/// `splice_queue_limit` in bytes; 0 ("0"): no limit. Unset: a quarter of
/// `kernel_memory` (within the key's range).
pub fn splice_queue_limit(
    loc: &Locator<'_>,
    v: &Option<Spanned<String>>,
    kernel_memory: u64,
) -> Result<u64, ConfigError> {
    let range = Range { off: true, min: (1 << 20, "1MiB"), max: (64 << 30, "64GiB") };
    let default = (kernel_memory / SPLICE_QUEUE_SHARE).clamp(range.min.0, range.max.0);
    size(loc, "splice_queue_limit", v, default, range)
}

/// `kernel_memory` in bytes: 16MiB to 1024GiB.
pub fn kernel_memory(loc: &Locator<'_>, v: &Option<Spanned<String>>) -> Result<u64, ConfigError> {
    let range = Range { off: false, min: (16 << 20, "16MiB"), max: (1 << 40, "1024GiB") };
    size(loc, "kernel_memory", v, super::memory::DEFAULT_KERNEL_MEMORY, range)
}

/// What a size key takes: 0 (off) if `off`, else bytes from `min` to `max`
/// (each with how the error writes it).
struct Range {
    off: bool,
    min: (u64, &'static str),
    max: (u64, &'static str),
}

/// `key`'s size: `default` when unset.
fn size(
    loc: &Locator<'_>,
    key: &str,
    v: &Option<Spanned<String>>,
    default: u64,
    range: Range,
) -> Result<u64, ConfigError> {
    let Some(v) = v else { return Ok(default) };
    let text = v.get_ref().trim();
    let example = if range.off { "\"8MiB\", \"512KiB\" or \"0\" (off)" } else { "\"256MiB\", \"2GiB\" or \"65536\"" };
    let bytes =
        parse(text).ok_or_else(|| loc.at(v, format!("{key} = \"{text}\": expected a size such as {example}")))?;
    let off = range.off && bytes == 0;
    if !off && !(range.min.0..=range.max.0).contains(&bytes) {
        let (min, max) = (range.min.1, range.max.1);
        let what = if range.off {
            format!("must be 0 (off) or between {min} and {max}")
        } else {
            format!("must be between {min} and {max}")
        };
        return Err(loc.at(v, format!("{key} = \"{text}\": {what}")));
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
