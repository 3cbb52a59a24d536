//! Small utilities every other module may use and that use nothing of ctseg but its error type:
//! statistics of timings, CSV fields, atomic file output with the one output-safety policy, and process
//! facts. Kept here so that `train`, `bench` and `report` do not depend on each other for them.

pub mod fs;
pub mod stats;
pub mod sys;

/// `s` as one CSV field (RFC 4180): quoted, inner quotes doubled, when it holds a comma, a
/// quote or a line break (a run label, a case's path).
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The first item of `items` equal to an earlier one: a flag's list that names a value twice
/// (a run, a target, a case) is refused rather than measured or drawn twice.
pub fn first_repeat<T: PartialEq>(items: &[T]) -> Option<&T> {
    items
        .iter()
        .enumerate()
        .find(|(i, x)| items[..*i].contains(x))
        .map(|(_, x)| x)
}

/// FNV-1a 64 of `bytes`: a cheap fingerprint (of weights, manifests, configs) that is the same
/// on every machine, used to check that ranks and runs agree, never for security.
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_repeat_is_the_value_whose_repeat_comes_first() {
        assert_eq!(first_repeat(&[1, 2, 3]), None);
        assert_eq!(first_repeat::<u8>(&[]), None);
        // 3 repeats before 2 does: the first repeat met, reading left to right.
        assert_eq!(first_repeat(&[2, 3, 3, 2]), Some(&3));
    }
}
