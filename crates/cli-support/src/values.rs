//! Value parsers for numeric and duration flags whose every error names the
//! accepted range, whatever was typed: clap's own integer parsers answer a
//! value past the type with "number too large to fit in target type", and
//! a negative number is taken for an unknown flag unless the argument
//! allows it (`allow_negative_numbers`, set by the callers).

use std::fmt::Display;
use std::time::Duration;

/// Parses a whole number in `min..=max`.
///
/// ```
/// let parse = numstream_cli_support::values::integer_in(1u32, 10);
/// assert_eq!(parse("7"), Ok(7));
/// assert_eq!(parse("11"), Err(r#"must be between 1 and 10 (got "11")"#.to_owned()));
/// assert!(parse("99999999999999999999999999999999999999999").is_err());
/// ```
pub fn integer_in<T>(min: T, max: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync
where
    T: TryFrom<i128> + Into<i128> + Copy + Display + Send + Sync,
{
    move |text: &str| {
        let out_of_range = || format!("must be between {min} and {max} (got {text:?})");
        let value: i128 = text.trim().parse().map_err(|_| out_of_range())?;
        if value < min.into() || value > max.into() {
            return Err(out_of_range());
        }
        T::try_from(value).map_err(|_| out_of_range())
    }
}

/// Parses a duration with a unit (`5s`, `500ms`, `2m`) in `min..=max`;
/// `range` is how the error names the range (e.g. "1ms and 1h"). Every
/// failure (not a duration, negative, beyond what a `Duration` holds, out
/// of range) gets the one message.
///
/// ```
/// use std::time::Duration;
/// let parse = numstream_cli_support::values::duration_in(
///     Duration::from_millis(1), Duration::from_secs(3600), "1ms and 1h");
/// assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
/// for bad in ["2h", "0s", "999999999999999999999s", "soon", "-1s"] {
///     assert!(parse(bad).unwrap_err().contains("between 1ms and 1h"));
/// }
/// ```
pub fn duration_in(
    min: Duration,
    max: Duration,
    range: &'static str,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync {
    move |text: &str| match humantime::parse_duration(text.trim()) {
        Ok(duration) if (min..=max).contains(&duration) => Ok(duration),
        _ => Err(format!(
            "must be a duration between {range}, such as 5s, 500ms or 2m (got {text:?})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_outside_the_type_or_the_range_name_the_range() {
        let parse = integer_in(0u16, 65535);
        for text in [
            "-1",
            "65536",
            "18446744073709551616",
            "1e3",
            "",
            " ",
            "0x10",
        ] {
            let error = parse(text).expect_err(text);
            assert!(
                error.contains("must be between 0 and 65535"),
                "{text}: {error}"
            );
        }
        assert_eq!(parse(" 42 "), Ok(42));
        let parse = integer_in(i64::MIN as i128 as i64, i64::MAX);
        assert_eq!(parse("-5"), Ok(-5));
        let parse = integer_in(1u64, u64::MAX);
        assert_eq!(parse("18446744073709551615"), Ok(u64::MAX));
        assert!(parse("0").is_err());
    }

    #[test]
    fn durations_outside_the_range_name_it() {
        let parse = duration_in(Duration::ZERO, Duration::from_secs(3600), "0s and 1h");
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        for text in [
            "1h 1ns",
            "-1s",
            "5",
            "",
            "1000000000000000000000000s",
            "3 fortnights",
        ] {
            let error = parse(text).expect_err(text);
            assert!(error.contains("between 0s and 1h"), "{text}: {error}");
        }
    }
}
