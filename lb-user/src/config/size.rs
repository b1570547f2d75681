//! `send_buffer`: a byte size written as `"8MiB"`, `"512KiB"` or `"65536"`.

use toml::Spanned;

use super::error::{ConfigError, Locator};

/// Default `send_buffer`: see the config reference in the README.
pub const DEFAULT_SEND_BUFFER: u32 = 8 << 20;
/// Smallest and largest `send_buffer` (the kernel doubles it into an int).
const MIN: u64 = 64 << 10;
const MAX: u64 = 512 << 20;

/// `send_buffer` in bytes; 0 ("0"): leave the kernel's autotuning alone.
pub fn send_buffer(loc: &Locator<'_>, v: &Option<Spanned<String>>) -> Result<u32, ConfigError> {
    let Some(v) = v else { return Ok(DEFAULT_SEND_BUFFER) };
    let text = v.get_ref().trim();
    let bytes = parse(text).ok_or_else(|| {
        loc.at(v, format!("send_buffer = \"{text}\": expected a size such as \"8MiB\", \"512KiB\" or \"0\" (off)"))
    })?;
    if bytes != 0 && !(MIN..=MAX).contains(&bytes) {
        return Err(loc.at(v, format!("send_buffer = \"{text}\": must be 0 (off) or between 64KiB and 512MiB")));
    }
    Ok(bytes as u32)
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
