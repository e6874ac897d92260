//! Parsers for linkemu's command-line values: rates in bits per second (`100M`, `1gbit`),
//! durations (`25ms`, `1.5s`), probabilities (`1%`, `0.001`), cuts (`10s+45s`) and
//! Gilbert–Elliott parameters. Rates are *bits* and decimal, as `tc` and link datasheets
//! count them, unlike `transfer::units` (bytes, binary) which sizes files.

use super::model::{GilbertElliott, Nanos};

fn split_number(text: &str) -> Result<(f64, String), String> {
    let t = text.trim();
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(end);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?}: expected a number followed by a unit"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("{text:?}: must be a finite, non-negative number"));
    }
    Ok((value, unit.trim().to_ascii_lowercase()))
}

/// `100M`, `100mbit`, `1G`, `1.5gbit`, `500k`, `1000000` → bits per second.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let (value, unit) = split_number(text)?;
    let unit = unit
        .strip_suffix("bit")
        .or_else(|| unit.strip_suffix("bps"))
        .unwrap_or(&unit);
    let scale = match unit {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        other => {
            return Err(format!(
                "{text:?}: unknown rate unit {other:?} (use k, M or G, bits per second)"
            ))
        }
    };
    let bps = value * scale;
    if bps < 8_000.0 {
        return Err(format!("{text:?}: a rate below 8 kbit/s is not a link"));
    }
    Ok(bps as u64)
}

/// `25ms`, `1.5s`, `150us`, `0` → nanoseconds. A bare non-zero number is refused: is it
/// seconds or milliseconds?
pub fn parse_duration(text: &str) -> Result<Nanos, String> {
    let (value, unit) = split_number(text)?;
    let scale = match unit.as_str() {
        "" if value == 0.0 => 0.0,
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "m" | "min" => 60e9,
        "" => return Err(format!("{text:?}: give a unit (ms, s, us)")),
        other => return Err(format!("{text:?}: unknown time unit {other:?}")),
    };
    Ok((value * scale).round() as Nanos)
}

/// `1%`, `0.1%` or a fraction `0.001` → probability in [0, 1].
pub fn parse_probability(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let (num, scale) = match t.strip_suffix('%') {
        Some(n) => (n, 0.01),
        None => (t, 1.0),
    };
    let p =
        num.trim().parse::<f64>().map_err(|_| {
            format!("{text:?}: expected a percentage like 1% or a fraction like 0.01")
        })? * scale;
    if !(0.0..=1.0).contains(&p) {
        return Err(format!("{text:?}: a probability is between 0% and 100%"));
    }
    Ok(p)
}

/// `START+LENGTH`, e.g. `10s+45s`: the link goes down at START for LENGTH.
pub fn parse_cut(text: &str) -> Result<(Nanos, Nanos), String> {
    let (start, len) = text
        .split_once('+')
        .ok_or_else(|| format!("{text:?}: expected START+LENGTH, e.g. 10s+45s"))?;
    Ok((parse_duration(start)?, parse_duration(len)?))
}

/// `P_GOOD_TO_BAD,P_BAD_TO_GOOD[,LOSS_BAD[,LOSS_GOOD]]`, e.g. `0.25%,25%` (loss while bad
/// defaults to 100%, while good to 0%).
pub fn parse_gilbert_elliott(text: &str) -> Result<GilbertElliott, String> {
    let parts: Vec<&str> = text.split(',').collect();
    if !(2..=4).contains(&parts.len()) {
        return Err(format!(
            "{text:?}: expected P_GOOD_TO_BAD,P_BAD_TO_GOOD[,LOSS_BAD[,LOSS_GOOD]]"
        ));
    }
    let get = |i: usize, default: f64| -> Result<f64, String> {
        parts.get(i).map_or(Ok(default), |p| parse_probability(p))
    };
    let ge = GilbertElliott {
        p_good_to_bad: get(0, 0.0)?,
        p_bad_to_good: get(1, 0.0)?,
        loss_bad: get(2, 1.0)?,
        loss_good: get(3, 0.0)?,
    };
    if ge.p_bad_to_good == 0.0 && ge.p_good_to_bad > 0.0 {
        return Err(format!(
            "{text:?}: P_BAD_TO_GOOD of 0 would never leave the bad state"
        ));
    }
    Ok(ge)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_decimal_bits() {
        assert_eq!(parse_rate("100M"), Ok(100_000_000));
        assert_eq!(parse_rate("100mbit"), Ok(100_000_000));
        assert_eq!(parse_rate("1G"), Ok(1_000_000_000));
        assert_eq!(parse_rate("1.5Gbit"), Ok(1_500_000_000));
        assert_eq!(parse_rate("16M"), Ok(16_000_000));
        assert_eq!(parse_rate("500k"), Ok(500_000));
        assert!(parse_rate("10X").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("-1M").is_err());
        assert!(parse_rate("0").is_err());
    }

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("25ms"), Ok(25_000_000));
        assert_eq!(parse_duration("1.5s"), Ok(1_500_000_000));
        assert_eq!(parse_duration("150us"), Ok(150_000));
        assert_eq!(parse_duration("0"), Ok(0));
        assert!(parse_duration("25").is_err());
        assert!(parse_duration("25h").is_err());
    }

    #[test]
    fn probabilities() {
        assert_eq!(parse_probability("1%"), Ok(0.01));
        assert!((parse_probability("0.1%").unwrap() - 0.001).abs() < 1e-12);
        assert_eq!(parse_probability("0.25"), Ok(0.25));
        assert!(parse_probability("101%").is_err());
        assert!(parse_probability("2").is_err());
        assert!(parse_probability("x%").is_err());
    }

    #[test]
    fn cuts_and_bursts() {
        assert_eq!(parse_cut("10s+45s"), Ok((10_000_000_000, 45_000_000_000)));
        assert!(parse_cut("10s").is_err());
        let ge = parse_gilbert_elliott("0.25%,25%").unwrap();
        assert_eq!(ge.loss_bad, 1.0);
        assert_eq!(ge.loss_good, 0.0);
        assert!((ge.p_good_to_bad - 0.0025).abs() < 1e-12);
        let ge = parse_gilbert_elliott("1%,10%,50%,0.1%").unwrap();
        assert_eq!(ge.loss_bad, 0.5);
        assert!(parse_gilbert_elliott("1%").is_err());
        assert!(parse_gilbert_elliott("1%,0").is_err());
    }
}
