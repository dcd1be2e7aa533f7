//! Seeds for randomized tests: every seed is printed, and `DUET_SEED`
//! (decimal or `0x` hex) replaces it, so that a failure can be repeated
//! with the seed its output names.

/// The variable that sets the seed of every randomized test in a run.
pub const SEED_VAR: &str = "DUET_SEED";

/// A small deterministic PRNG (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0, which xorshift cannot leave, is moved).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn parse(v: &str) -> Option<u64> {
    let v = v.trim();
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16).ok(),
        None => v.replace('_', "").parse().ok(),
    }
}

/// The seed for `what`: `DUET_SEED` if set, else `default`, else one from
/// the clock. Printed to stderr either way, with how to repeat it. Panics
/// on a `DUET_SEED` that is not a number (a typo must not silently test
/// something else).
pub fn seed(what: &str, default: Option<u64>) -> u64 {
    let (seed, from) = match std::env::var(SEED_VAR) {
        Ok(v) => (
            parse(&v).unwrap_or_else(|| panic!("{SEED_VAR}={v:?} is not a number")),
            SEED_VAR,
        ),
        Err(_) => match default {
            Some(s) => (s, "fixed"),
            None => (
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64),
                "clock",
            ),
        },
    };
    eprintln!("{what}: seed {seed:#x} ({from}; repeat with {SEED_VAR}={seed:#x})");
    seed
}

/// An [`Rng`] seeded by [`seed`].
pub fn rng(what: &str, default: Option<u64>) -> Rng {
    Rng::new(seed(what, default))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let (mut a, mut b, mut c) = (Rng::new(7), Rng::new(7), Rng::new(8));
        let va: Vec<u64> = (0..8).map(|_| a.next()).collect();
        let vb: Vec<u64> = (0..8).map(|_| b.next()).collect();
        let vc: Vec<u64> = (0..8).map(|_| c.next()).collect();
        assert_eq!(va, vb);
        assert_ne!(va, vc);
        assert_ne!(Rng::new(0).next(), 0);
    }

    #[test]
    fn parses_decimal_and_hex() {
        assert_eq!(parse("42"), Some(42));
        assert_eq!(parse(" 0x5eed_0001 "), Some(0x5eed_0001));
        assert_eq!(parse("seed"), None);
    }
}
