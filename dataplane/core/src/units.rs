//! Values of flags and environment variables with units.

/// Parses a byte count: a number, optionally followed by `KiB`, `MiB`, `GiB` or `TiB`
/// (`256MiB`, `10GiB`, `1048576`).
pub fn parse_bytes(value: &str) -> Result<u64, String> {
    let value = value.trim();
    let digits = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a byte count such as 256MiB"))?;
    let shift = match unit.trim() {
        "" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        other => return Err(format!("unknown unit {other:?}: use KiB, MiB, GiB or TiB")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{value} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn byte_counts_take_binary_units() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("10 GiB"), Ok(10 << 30));
        assert_eq!(parse_bytes("0"), Ok(0));
        assert!(parse_bytes("10GB").is_err());
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("99999999TiB").is_err());
    }
}
