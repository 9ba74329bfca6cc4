//! The wall clock as UTC calendar fields, for log timestamps and request
//! signatures, without a date crate in every function.

/// A UTC time of day on a calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Utc {
    pub(crate) year: i64,
    pub(crate) month: i64,
    pub(crate) day: i64,
    pub(crate) hour: i64,
    pub(crate) minute: i64,
    pub(crate) second: i64,
    pub(crate) millis: i64,
}

impl Utc {
    pub(crate) fn now() -> Self {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Self::from_unix_millis(ms)
    }

    pub(crate) fn from_unix_millis(ms: i64) -> Self {
        let (secs, millis) = (ms.div_euclid(1000), ms.rem_euclid(1000));
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        Self {
            year: yoe + era * 400 + i64::from(month <= 2),
            month,
            day,
            hour: rem / 3600,
            minute: (rem % 3600) / 60,
            second: rem % 60,
            millis,
        }
    }

    /// `20150830`, the date of a SigV4 scope.
    pub(crate) fn basic_date(&self) -> String {
        format!("{:04}{:02}{:02}", self.year, self.month, self.day)
    }

    /// `20150830T123600Z`, SigV4's `X-Amz-Date`.
    pub(crate) fn basic_date_time(&self) -> String {
        format!(
            "{}T{:02}{:02}{:02}Z",
            self.basic_date(),
            self.hour,
            self.minute,
            self.second
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        let t = Utc::from_unix_millis(1_440_938_160_123);
        assert_eq!(t.basic_date_time(), "20150830T123600Z");
        assert_eq!(t.millis, 123);
        assert_eq!(
            Utc::from_unix_millis(0).basic_date_time(),
            "19700101T000000Z"
        );
        // A leap day.
        assert_eq!(
            Utc::from_unix_millis(951_782_400_000).basic_date(),
            "20000229"
        );
    }
}
