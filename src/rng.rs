//! Deterministic, fast pseudo-random numbers (xoshiro256++ seeded through splitmix64).
//!
//! spdlab draws every random number (data, masks, initialisation) from this generator so that
//! the same seed gives the same result on every machine, independent of candle's own RNG.

/// xoshiro256++ generator.
///
/// A generator may be narrowed to a window of rows of a batch ([`Rng::for_rows`]): per-row
/// draws ([`Rng::uniform_rows`]) then advance it exactly as for the whole batch but return
/// only the window's rows. Shards of a batch trained on separate threads thus see the very
/// numbers the whole batch would have drawn, whatever the number of threads.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
    /// `(first row, rows of the whole batch)` when narrowed to a window.
    window: Option<(usize, usize)>,
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator whose whole stream is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut st = seed;
        let s = [
            splitmix64(&mut st),
            splitmix64(&mut st),
            splitmix64(&mut st),
            splitmix64(&mut st),
        ];
        Rng { s, window: None }
    }

    /// The full internal state (to save and resume a run).
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    /// Restores a state from [`Rng::state`]. An all-zero state is invalid and is replaced.
    pub fn from_state(s: [u64; 4]) -> Self {
        if s == [0; 4] {
            return Rng::new(0);
        }
        Rng { s, window: None }
    }

    /// A copy narrowed to rows `start..` of a batch of `full` rows (see the type's docs).
    pub fn for_rows(&self, start: usize, full: usize) -> Rng {
        Rng {
            s: self.s,
            window: Some((start, full)),
        }
    }

    /// `(first row, rows of the whole batch)` for a draw over `n` local rows.
    pub fn rows(&self, n: usize) -> (usize, usize) {
        self.window.unwrap_or((0, n))
    }

    /// `n × k` uniform samples for `n` rows of `k` values: the window's rows of a draw over
    /// the whole batch.
    pub fn uniform_rows(&mut self, n: usize, k: usize) -> Vec<f32> {
        let (start, full) = self.rows(n);
        self.skip(start * k);
        let v = self.uniform_vec(n * k);
        self.skip(full.saturating_sub(start + n) * k);
        v
    }

    /// As [`Rng::uniform_rows`] with fair bits (0 or 1).
    pub fn bits_rows(&mut self, n: usize, k: usize) -> Vec<f32> {
        let (start, full) = self.rows(n);
        self.skip(start * k);
        let v = (0..n * k).map(|_| (self.next_u64() >> 63) as f32).collect();
        self.skip(full.saturating_sub(start + n) * k);
        v
    }

    /// Advances past `count` outputs (each uniform or bit sample uses one).
    fn skip(&mut self, count: usize) {
        for _ in 0..count {
            self.next_u64();
        }
    }

    /// An independent generator derived from this one's seed and a stream label.
    pub fn fork(&mut self, label: u64) -> Rng {
        let base = self.next_u64();
        Rng::new(base ^ label.wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let result = (self.s[0].wrapping_add(self.s[3]))
            .rotate_left(23)
            .wrapping_add(self.s[0]);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 24 bits of precision.
    #[inline]
    pub fn uniform_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in [0, 1) with 53 bits of precision.
    #[inline]
    pub fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `0..n` (n > 0).
    #[inline]
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "Rng::below(0)");
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal sample (Box–Muller).
    pub fn normal_f32(&mut self) -> f32 {
        loop {
            let u1 = self.uniform_f64();
            if u1 <= f64::MIN_POSITIVE {
                continue;
            }
            let u2 = self.uniform_f64();
            let r = (-2.0 * u1.ln()).sqrt();
            return (r * (2.0 * std::f64::consts::PI * u2).cos()) as f32;
        }
    }

    /// `n` uniform samples in [0, 1).
    pub fn uniform_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform_f32()).collect()
    }

    /// `n` normal samples with the given standard deviation.
    pub fn normal_vec(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal_f32() * std).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut c = Rng::new(8);
        assert_ne!(Rng::new(7).next_u64(), c.next_u64());
    }

    #[test]
    fn row_windows_see_the_whole_batch_numbers() {
        let mut whole = Rng::new(3);
        let all = whole.uniform_rows(10, 3);
        let bits = whole.bits_rows(10, 2);
        let base = Rng::new(3);
        for (start, n) in [(0, 4), (4, 6), (9, 1)] {
            let mut w = base.for_rows(start, 10);
            assert_eq!(w.uniform_rows(n, 3), all[start * 3..(start + n) * 3]);
            assert_eq!(w.bits_rows(n, 2), bits[start * 2..(start + n) * 2]);
            // The generator ends where the whole batch's did.
            assert_eq!(w.state(), whole.state());
        }
    }

    #[test]
    fn uniform_and_normal_moments() {
        let mut r = Rng::new(1);
        let n = 200_000;
        let u = r.uniform_vec(n);
        let mean: f64 = u.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01);
        assert!(u.iter().all(|&x| (0.0..1.0).contains(&x)));
        let z = r.normal_vec(n, 2.0);
        let m: f64 = z.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let v: f64 = z.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n as f64;
        assert!(m.abs() < 0.02 && (v.sqrt() - 2.0).abs() < 0.02, "{m} {v}");
        for _ in 0..1000 {
            assert!(r.below(7) < 7);
        }
    }
}
