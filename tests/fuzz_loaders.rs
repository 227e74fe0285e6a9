//! Fuzz-style robustness: thousands of mutated files fed to both loaders must give Ok or Err,
//! never a panic.

use std::panic::{AssertUnwindSafe, catch_unwind};

use candle_core::Device;
use spdlab::io::spdlab_file::{self, FileExtras};

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut XorShift, base: &[u8]) -> Vec<u8> {
    let mut b = base.to_vec();
    let n_edits = 1 + rng.below(4);
    for _ in 0..n_edits {
        match rng.below(6) {
            0 => {
                let i = rng.below(b.len());
                if i < b.len() {
                    b[i] ^= 1 << rng.below(8);
                }
            }
            1 => {
                let i = rng.below(b.len());
                if i < b.len() {
                    b[i] = [0u8, 0xff, b'"', b'{', b'9', b'-'][rng.below(6)];
                }
            }
            2 => b.truncate(rng.below(b.len() + 1)),
            3 => {
                let i = rng.below(b.len() + 1);
                let junk: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                b.splice(i..i, junk);
            }
            4 => {
                let i = rng.below(b.len());
                let j = (i + 1 + rng.below(64)).min(b.len());
                b.drain(i..j);
            }
            _ => {
                // Mutate inside the JSON header, where most structure lives.
                let hlen = b
                    .get(..8)
                    .map(|h| u64::from_le_bytes(h.try_into().unwrap()) as usize)
                    .unwrap_or(0);
                let end = (8 + hlen).min(b.len());
                if end > 8 {
                    let i = 8 + rng.below(end - 8);
                    b[i] = b"0123456789,:[]{}\"eE.-"[rng.below(21)];
                }
            }
        }
    }
    b
}

#[test]
fn mutated_spdlab_files_never_panic() {
    let cfg = {
        let mut c = spdlab::presets::spd_config("tms-5-2").unwrap();
        c.steps = 2;
        c
    };
    let target = spdlab::presets::target_model("tms-5-2", &Device::Cpu).unwrap();
    let mut tr = spdlab::spd::trainer::Trainer::new(target, cfg).unwrap();
    tr.step().unwrap();
    let base = spdlab_file::to_bytes(&tr, &FileExtras::default()).unwrap();
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    let (mut ok, mut err) = (0, 0);
    for i in 0..2000 {
        let m = mutate(&mut rng, &base);
        let r = catch_unwind(AssertUnwindSafe(|| {
            spdlab_file::from_bytes(&m, &Device::Cpu).is_ok()
        }));
        match r {
            Ok(true) => ok += 1,
            Ok(false) => err += 1,
            Err(_) => panic!("loader panicked on mutation {i}"),
        }
    }
    assert!(
        err > 1000,
        "most mutations should be rejected ({ok} ok, {err} err)"
    );
}

#[test]
fn mutated_checkpoints_never_panic() {
    let base = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ref-tms_5-2/model_10000.pth"
    ))
    .unwrap();
    let mut rng = XorShift(0xfeed_beef_cafe_0001);
    for i in 0..2000 {
        let m = mutate(&mut rng, &base);
        let r = catch_unwind(AssertUnwindSafe(|| {
            spdlab::io::pth::read_pth_bytes(&m, "mutated.pth").is_ok()
        }));
        assert!(r.is_ok(), "checkpoint reader panicked on mutation {i}");
    }
}
