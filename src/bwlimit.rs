//! Bandwidth limits (`--source-bwlimit`, `--target-bwlimit`): parsing the
//! rate syntax syncoid hands to mbuffer (`10M`, `1.5G`, `800k`, binary
//! suffixes), and a token bucket that tells the stream pump how long to wait
//! before each write. The bucket is pure arithmetic on a clock reading passed
//! in, so it is tested with a fake clock; [`Limiter`] adds the real clock and
//! the sleeping. Integer nanosecond arithmetic throughout: no float drift, no
//! overflow at 1 byte/s or at the largest rate the parser accepts.

use std::time::{Duration, Instant};

const KIB: u64 = 1024;
const NANOS: u128 = 1_000_000_000;

/// Largest rate accepted: 1 PiB/s is far beyond any link, and keeps every
/// product below in range.
pub const MAX_RATE: u64 = 1 << 50;

/// Parses a rate in bytes per second: a decimal number (`65536`, `1.5`) with
/// an optional binary suffix k/K, m/M, g/G, t/T (powers of 1024, as mbuffer
/// reads them), then an optional `B` or `iB`, then an optional `/s`.
/// Anything else, and rates below 1 byte/s or above [`MAX_RATE`], is an
/// error whose message names the value and the expected syntax.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let hint = "use bytes per second like 65536, 800k, 10M, 1.5G (k/M/G/T are powers of 1024)";
    let t = s.trim();
    if t.is_empty() {
        return Err(format!("empty rate; {hint}"));
    }
    if t.starts_with('-') {
        return Err(format!("rate {s:?} is negative; {hint}"));
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let digits = number.chars().filter(char::is_ascii_digit).count();
    if digits == 0 || number.matches('.').count() > 1 {
        return Err(format!("invalid rate {s:?}; {hint}"));
    }
    let rest = suffix.strip_suffix("/s").unwrap_or(suffix);
    let (multiplier, unit) = match rest.chars().next() {
        Some('k' | 'K') => (KIB, &rest[1..]),
        Some('m' | 'M') => (KIB.pow(2), &rest[1..]),
        Some('g' | 'G') => (KIB.pow(3), &rest[1..]),
        Some('t' | 'T') => (KIB.pow(4), &rest[1..]),
        _ => (1, rest),
    };
    let unit_ok = match unit {
        "" | "B" => true,
        "iB" => multiplier > 1,
        _ => false,
    };
    if !unit_ok {
        return Err(format!(
            "invalid rate {s:?}: unknown unit {suffix:?} (bits are not accepted); {hint}"
        ));
    }
    let bytes = scale(number, multiplier)
        .filter(|b| *b <= MAX_RATE as u128)
        .ok_or_else(|| format!("rate {s:?} is too large; the limit is 1024T (1 PiB/s)"))?;
    if bytes == 0 {
        return Err(format!("rate {s:?} is zero; {hint}"));
    }
    Ok(bytes as u64)
}

/// `number` (digits with at most one '.') times `multiplier`, rounded down,
/// exactly; None when it does not fit.
fn scale(number: &str, multiplier: u64) -> Option<u128> {
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let mut value: u128 = 0;
    for d in int.bytes() {
        value = value.checked_mul(10)?.checked_add(u128::from(d - b'0'))?;
        if value > MAX_RATE as u128 {
            return None;
        }
    }
    let mut bytes = value.checked_mul(u128::from(multiplier))?;
    // Fraction digits beyond 18 cannot change the result by a byte at any
    // multiplier we accept.
    let frac = &frac[..frac.len().min(18)];
    if !frac.is_empty() {
        let mut f: u128 = 0;
        for d in frac.bytes() {
            f = f * 10 + u128::from(d - b'0');
        }
        bytes += f * u128::from(multiplier) / 10u128.pow(frac.len() as u32);
    }
    Some(bytes)
}

/// The rate the stream gets: both limits throttle the same single stream in
/// the pump, so the smaller one wins.
pub fn effective(source: Option<u64>, target: Option<u64>) -> Option<u64> {
    match (source, target) {
        (Some(s), Some(t)) => Some(s.min(t)),
        (s, t) => s.or(t),
    }
}

/// Pure token bucket. Tokens are bytes scaled by 1e9 (byte-nanoseconds per
/// second), so refilling by `elapsed_ns * rate` is exact. A request larger
/// than the tokens on hand is granted at once and leaves a debt that the
/// returned wait pays off, so the long-run average is exactly `rate` and the
/// caller never has to retry.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// Scaled tokens; negative is debt.
    tokens: i128,
    /// Clock reading of the last refill.
    last: Duration,
}

impl TokenBucket {
    /// A full bucket for `rate` bytes/s (clamped to 1..=[`MAX_RATE`]) at
    /// clock reading `now`.
    pub fn new(rate: u64, now: Duration) -> TokenBucket {
        let rate = rate.clamp(1, MAX_RATE);
        let burst = burst_for(rate);
        TokenBucket {
            rate,
            burst,
            tokens: i128::from(burst) * NANOS as i128,
            last: now,
        }
    }

    #[cfg(test)]
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Most bytes that can go out back to back after an idle spell.
    #[cfg(test)]
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Size to split writes into so that a low rate flows evenly: about a
    /// twentieth of a second's worth, from 1 KiB (or the whole rate, if
    /// lower) up to 256 KiB, and never more than the burst.
    pub fn chunk(&self) -> usize {
        let c = (self.rate / 20).clamp(KIB.min(self.rate), 256 * KIB);
        c.min(self.burst) as usize
    }

    /// Takes `n` bytes' worth of tokens at clock reading `now` and returns
    /// how long the caller must wait before sending them (zero if they were
    /// on hand). A clock reading older than the last one counts as no time.
    pub fn acquire(&mut self, n: u64, now: Duration) -> Duration {
        let full = i128::from(self.burst) * NANOS as i128;
        if let Some(elapsed) = now.checked_sub(self.last) {
            let room = full.saturating_sub(self.tokens).max(0) as u128;
            let refill = elapsed.as_nanos().saturating_mul(u128::from(self.rate));
            self.tokens = self.tokens.saturating_add(refill.min(room) as i128);
            self.last = now;
        }
        self.tokens = self
            .tokens
            .saturating_sub(i128::from(n).saturating_mul(NANOS as i128));
        if self.tokens >= 0 {
            return Duration::ZERO;
        }
        // Debt in scaled bytes / rate = nanoseconds, rounded up.
        let debt = (-self.tokens) as u128;
        let nanos = debt.div_ceil(u128::from(self.rate));
        Duration::from_nanos(nanos.min(u64::MAX as u128) as u64)
    }
}

/// The bucket's depth: a twentieth of a second's worth, at least 64 KiB
/// (one SSH window's worth of small writes), at most 16 MiB.
fn burst_for(rate: u64) -> u64 {
    (rate / 20).clamp(64 * KIB, 16 * KIB * KIB)
}

/// A [`TokenBucket`] on the monotonic clock, for the pump's writing side.
#[derive(Debug)]
pub struct Limiter {
    bucket: TokenBucket,
    origin: Instant,
}

impl Limiter {
    /// A limiter at `rate` bytes/s, starting with a full bucket.
    pub fn new(rate: u64) -> Limiter {
        Limiter {
            bucket: TokenBucket::new(rate, Duration::ZERO),
            origin: Instant::now(),
        }
    }

    /// See [`TokenBucket::chunk`].
    pub fn chunk(&self) -> usize {
        self.bucket.chunk()
    }

    /// Blocks until `n` more bytes may be written.
    pub fn wait_for(&mut self, n: usize) {
        let wait = self.bucket.acquire(n as u64, self.origin.elapsed());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn rates_parse_with_binary_suffixes_and_optional_units() {
        for (text, bytes) in [
            ("65536", 65536),
            ("1", 1),
            ("10M", 10 * MIB),
            ("10m", 10 * MIB),
            ("1.5G", 1536 * MIB),
            ("1.5g", 1536 * MIB),
            ("800k", 800 * 1024),
            ("512K", 512 * 1024),
            ("2T", 2 * 1024 * 1024 * MIB),
            ("4MB", 4 * MIB),
            ("4MiB", 4 * MIB),
            ("4M/s", 4 * MIB),
            ("4MiB/s", 4 * MIB),
            ("100B", 100),
            ("100B/s", 100),
            ("100/s", 100),
            (" 8k ", 8192),
            ("0.5k", 512),
            (".5k", 512),
            ("1.", 1),
            ("1024T", MAX_RATE),
            ("0.1M", 104_857),
        ] {
            assert_eq!(parse_rate(text), Ok(bytes), "{text:?}");
        }
    }

    #[test]
    fn bad_rates_are_refused_with_a_one_line_reason() {
        for bad in [
            "",
            " ",
            "0",
            "0k",
            "0.0M",
            "0.0001",
            "-5M",
            "-1",
            "fast",
            "NaN",
            "nan",
            "inf",
            "infinity",
            "1e6",
            "10 M",
            "10Mb",
            "10mb",
            "10X",
            "10KB/h",
            "10iB",
            "M",
            ".",
            "1.2.3",
            "1..5M",
            "10M/",
            "10M/s/s",
            "1025T",
            "99999999999999999999999999999999T",
            "18446744073709551616",
            "5MM",
            "+5M",
            "0x10",
        ] {
            let err = parse_rate(bad).expect_err(bad);
            assert!(!err.contains('\n'), "{bad:?}: {err}");
            assert!(!err.is_empty(), "{bad:?}");
        }
    }

    #[test]
    fn the_smaller_limit_wins() {
        assert_eq!(effective(None, None), None);
        assert_eq!(effective(Some(5), None), Some(5));
        assert_eq!(effective(None, Some(7)), Some(7));
        assert_eq!(effective(Some(9), Some(7)), Some(7));
        assert_eq!(effective(Some(3), Some(7)), Some(3));
    }

    /// Drives a bucket with a fake clock that advances only by the waits it
    /// returns (a writer that is infinitely fast otherwise): returns the
    /// clock reading when `total` bytes have been granted and waited for.
    fn simulate(rate: u64, total: u64, write: u64) -> Duration {
        let mut now = Duration::ZERO;
        let mut b = TokenBucket::new(rate, now);
        let mut sent = 0;
        while sent < total {
            let n = write.min(total - sent);
            now += b.acquire(n, now);
            sent += n;
        }
        now
    }

    #[test]
    fn the_long_run_average_matches_the_rate() {
        for (rate, total, write) in [
            (4 * MIB, 400 * MIB, 200 * 1024),
            (4 * MIB, 40 * MIB, 7),
            (1024, 16 * 1024 * 1024, 1024),
            (10 * MIB, 1000 * MIB, 256 * 1024),
            (1_000_003, 500_000_000, 65_537),
            (1536 * MIB, 100 * 1024 * MIB, 256 * 1024),
        ] {
            let took = simulate(rate, total, write).as_secs_f64();
            // The first burst is free; everything after it goes at the rate.
            let burst = burst_for(rate);
            let ideal = (total - burst) as f64 / rate as f64;
            let achieved = total as f64 / took;
            assert!(
                (took - ideal).abs() <= 0.001 * ideal + 1e-6,
                "rate {rate}: took {took}s, ideal {ideal}s"
            );
            assert!(
                (achieved / rate as f64 - 1.0).abs() < 0.03,
                "rate {rate}: achieved {achieved} B/s"
            );
        }
    }

    #[test]
    fn a_real_writer_with_its_own_delays_still_averages_the_rate() {
        // Writes that take time of their own (here 3 ms each) count toward
        // the wait instead of adding to it.
        let rate = 2 * MIB;
        let mut now = Duration::ZERO;
        let mut b = TokenBucket::new(rate, now);
        let total = 200 * MIB;
        let mut sent = 0;
        while sent < total {
            now += b.acquire(64 * 1024, now);
            now += Duration::from_millis(3);
            sent += 64 * 1024;
        }
        let achieved = total as f64 / now.as_secs_f64();
        assert!((achieved / rate as f64 - 1.0).abs() < 0.01, "{achieved}");
    }

    #[test]
    fn bursts_are_bounded_after_idling() {
        let rate = 4 * MIB;
        let mut b = TokenBucket::new(rate, Duration::ZERO);
        let burst = b.burst();
        assert_eq!(burst, rate / 20);
        // A full bucket gives exactly the burst at once, then makes us wait.
        assert_eq!(b.acquire(burst, Duration::ZERO), Duration::ZERO);
        assert!(b.acquire(1, Duration::ZERO) > Duration::ZERO);
        // An hour of idling refills only up to the burst, not an hour's worth.
        let later = Duration::from_secs(3600);
        assert_eq!(b.acquire(burst - 1, later), Duration::ZERO);
        let wait = b.acquire(rate, later);
        let expect = Duration::from_secs(1) - Duration::from_nanos(1_000_000_000 / rate);
        let diff = wait.as_nanos().abs_diff(expect.as_nanos());
        assert!(diff < 1000, "wait {wait:?}, expected about {expect:?}");
    }

    #[test]
    fn burst_and_chunk_sizes_stay_in_bounds() {
        for rate in [
            1,
            100,
            1024,
            64 * 1024,
            4 * MIB,
            100 * MIB,
            10_000 * MIB,
            MAX_RATE,
        ] {
            let b = TokenBucket::new(rate, Duration::ZERO);
            assert!((64 * 1024..=16 * MIB).contains(&b.burst()), "{rate}");
            let chunk = b.chunk() as u64;
            assert!(
                (1..=256 * 1024).contains(&chunk) && chunk <= b.burst(),
                "{rate}"
            );
            // A chunk never takes more than a second at the rate.
            assert!(chunk <= rate.max(1), "rate {rate}: chunk {chunk}");
        }
        assert_eq!(TokenBucket::new(1024, Duration::ZERO).chunk(), 1024);
        assert_eq!(TokenBucket::new(4 * MIB, Duration::ZERO).chunk(), 209_715);
    }

    #[test]
    fn very_low_and_very_high_rates_do_not_overflow() {
        // 1 byte/s: a 256 KiB write after the burst waits 256 Ki seconds.
        let mut b = TokenBucket::new(1, Duration::ZERO);
        assert_eq!(b.acquire(64 * 1024, Duration::ZERO), Duration::ZERO);
        assert_eq!(
            b.acquire(256 * 1024, Duration::ZERO),
            Duration::from_secs(256 * 1024)
        );
        // 1k: steady state one 1 KiB chunk per second.
        let mut b = TokenBucket::new(1024, Duration::ZERO);
        let mut now = Duration::ZERO;
        now += b.acquire(64 * 1024, now);
        assert_eq!(now, Duration::ZERO);
        for _ in 0..10 {
            let w = b.acquire(1024, now);
            assert_eq!(w, Duration::from_secs(1));
            now += w;
        }
        // The largest rate, huge requests and clock readings far apart.
        let mut b = TokenBucket::new(MAX_RATE, Duration::ZERO);
        let far = Duration::from_secs(u64::MAX / 4);
        assert_eq!(b.acquire(16 * MIB, far), Duration::ZERO);
        let w = b.acquire(u64::MAX / 2, far);
        assert!(w > Duration::from_secs(8000), "{w:?}");
        // Rates out of range are clamped, not trusted.
        assert_eq!(TokenBucket::new(0, Duration::ZERO).rate(), 1);
        assert_eq!(TokenBucket::new(u64::MAX, Duration::ZERO).rate(), MAX_RATE);
        // A clock that goes backwards gives no tokens and no panic.
        let mut b = TokenBucket::new(1024, Duration::from_secs(10));
        b.acquire(64 * 1024, Duration::from_secs(10));
        assert_eq!(
            b.acquire(1024, Duration::from_secs(5)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn the_real_limiter_sleeps_about_right() {
        // 200 KiB at 1 MiB/s after a 64 KiB burst: about 0.13 s.
        let mut l = Limiter::new(MIB);
        let start = Instant::now();
        let mut left = 200 * 1024;
        while left > 0 {
            let n = l.chunk().min(left);
            l.wait_for(n);
            left -= n;
        }
        let took = start.elapsed().as_secs_f64();
        let ideal = (200.0 - 64.0) / 1024.0;
        assert!(took >= ideal * 0.95 && took < ideal + 0.5, "{took}");
    }
}
