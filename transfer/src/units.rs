//! Parsing of human sizes and rates (`50M`, `1.5G`, `4096`).
//!
//! Suffixes are binary, like rsync's `--bwlimit`: K = 1024, M = 1024^2, G = 1024^3,
//! T = 1024^4; an optional trailing `B` or `/s` is accepted. Values are `u64` bytes.

/// Parses a size or rate; the error is a sentence for the user.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(format!(
                        "invalid size {text:?}: unknown unit {c:?} (use K, M, G or T)"
                    ))
                }
            };
            (&t[..i], mult)
        }
        _ => (t, 1),
    };
    let value: f64 = num.parse().map_err(|_| {
        format!("invalid size {text:?}: expected a number with an optional K/M/G/T suffix")
    })?;
    if !value.is_finite() || value <= 0.0 {
        return Err(format!("invalid size {text:?}: must be positive"));
    }
    let bytes = value * mult as f64;
    if bytes >= u64::MAX as f64 {
        return Err(format!("invalid size {text:?}: too large"));
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("50M"), Ok(50 << 20));
        assert_eq!(parse_size("50MB/s"), Ok(50 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        for bad in ["", "M", "-1M", "0", "5X", "abc", "1e400"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
