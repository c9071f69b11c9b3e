//! Time conversions and formatting shared by the identity code.

/// Seconds since the Unix epoch (negative: before it) as a `SystemTime`.
pub(super) fn unix_to_system(secs: i64) -> std::time::SystemTime {
    use std::time::{Duration, SystemTime};
    match u64::try_from(secs) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
    }
}

/// A time as `YYYY-MM-DDTHH:MM:SSZ` (UTC), for messages and logs.
pub fn fmt_time(t: std::time::SystemTime) -> String {
    let secs = match t.duration_since(std::time::SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    };
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{secs} s after 1970"),
    }
}
