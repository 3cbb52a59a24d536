//! The fuzz suite's machinery (tests/fuzz.rs): a seeded mutator of bytes and text, an allocator
//! that aborts on any single allocation above a bound, and the campaign runner that fuzzes each
//! format in a child process so that an abort, a giant allocation or a hang fails the test with
//! the seed that reproduces it.
//!
//! A campaign runs in two processes. The test (parent) re-executes its own test binary with
//! `--exact <test> --nocapture` and `CTSEG_FUZZ_CHILD=<test>`; the child bounds allocations,
//! prints `fuzz-case <test> <seed>` to stderr before each case, runs the case under
//! `catch_unwind` (a panic is recorded, and the next case runs), and fails if any case panicked.
//! The parent fails when the child fails, naming the panicking seeds, or, when the child died
//! (abort, signal, timeout), the last seed it printed.
//!
//! Knobs: `CTSEG_FUZZ_CASES=N` runs N cases per format (default: each format's own count, sized
//! so that the whole suite takes about a minute on two cores); `CTSEG_FUZZ_SEED=S` runs case S
//! alone; `CTSEG_FUZZ_START=S` starts the seeds at S (to explore beyond the default range);
//! `CTSEG_FUZZ_VERBOSE=1` prints every error a reader returned (to see how deep mutations get).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The largest single allocation a reader may make in a fuzz child: 512 MiB. Reading the
/// fixtures needs a few MB at most (the largest is a 512² DICOM slice and a 122×101×30 CT), so
/// only a size taken from the input without checking it (a u32 length → 4 GiB, i16 dims → 70 TB)
/// gets near it, while 512 MiB stays below what this shared 2-core, 24 GiB machine can give a
/// test without hurting its neighbours.
pub const ALLOCATION_BOUND: usize = 512 << 20;

/// The bound in force: unlimited until a fuzz child sets [`ALLOCATION_BOUND`].
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Reads that returned `Ok`, and reads that returned a (clean) error, in this child.
static OUTCOMES: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

/// Counts one read's outcome (reported by the parent, to show how deep the mutations reach).
pub fn record(ok: bool) {
    OUTCOMES[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
}

/// The system allocator, aborting with the request size when one allocation exceeds the bound
/// (`try_reserve` included: a fallible allocation of a size read from the input is still a
/// size the reader trusted). Installed as the global allocator of the fuzz test binary only.
pub struct BoundedAllocator;

fn check(size: usize) {
    let limit = LIMIT.load(Ordering::Relaxed);
    if size > limit {
        // Nothing here may allocate: stderr is unbuffered and formatting integers does not.
        let _ = writeln!(
            std::io::stderr(),
            "fuzz allocation guard: one allocation of {size} bytes, above the bound of {limit} bytes; aborting"
        );
        std::process::abort();
    }
}

// SAFETY: every call is forwarded to `System` with the caller's layout and pointer unchanged;
// `check` only reads an atomic and writes to stderr before aborting.
unsafe impl GlobalAlloc for BoundedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: forwarded as is.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: forwarded as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// SplitMix64: small, seedable, the same sequence everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// The stream of case `seed` of campaign `name` (each campaign's seeds are its own).
    pub fn new(name: &str, seed: u64) -> Self {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        Self(h ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// A length in `1..=max`, small lengths more likely (log-uniform).
    pub fn len(&mut self, max: usize) -> usize {
        let bits = usize::BITS - max.max(1).leading_zeros();
        let b = self.below(bits as usize + 1);
        (1 + self.below(1usize << b)).min(max.max(1))
    }
}

/// A header field of a binary format, for mutations that overwrite it with extreme values.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    /// Byte offset in the file.
    pub offset: usize,
    /// What it holds.
    pub kind: Kind,
}

/// What a [`Field`] holds (little-endian unless a mutation swaps it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// 16-bit integer.
    I16,
    /// 32-bit integer.
    I32,
    /// 64-bit integer.
    I64,
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// `n` bytes of text (a DICOM decimal string, a magic).
    Text(usize),
}

impl Field {
    /// A field at `offset`.
    pub const fn at(offset: usize, kind: Kind) -> Self {
        Self { offset, kind }
    }
}

const INTS: [i64; 20] = [
    0,
    1,
    -1,
    2,
    3,
    8,
    16,
    255,
    256,
    348,
    352,
    i16::MAX as i64,
    i16::MIN as i64,
    u16::MAX as i64,
    i32::MAX as i64,
    i32::MIN as i64,
    u32::MAX as i64,
    1 << 32,
    i64::MAX,
    i64::MIN,
];

const FLOATS: [f64; 16] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    1e20,
    -1e20,
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    f32::MAX as f64,
    f32::MIN_POSITIVE as f64,
    1e-30,
    348.0,
    352.5,
    1e300,
];

/// Interesting replacements for numbers and strings in text formats.
const TOKENS: [&str; 30] = [
    "0",
    "-0",
    "1",
    "-1",
    "2",
    "1e400",
    "-1e400",
    "1e-400",
    "nan",
    "inf",
    "-inf",
    "NaN",
    "18446744073709551616",
    "18446744073709551615",
    "9223372036854775807",
    "-9223372036854775808",
    "4294967296",
    "4294967295",
    "65536",
    "1.5",
    "0.0",
    "\"\"",
    "\"x\"",
    "true",
    "[]",
    "{}",
    "null",
    "0x10",
    "1_000",
    "[1e400, -1e400]",
];

/// Strings for DICOM text values and CSV cells.
const STRINGS: [&str; 12] = [
    "",
    "1e400",
    "nan",
    "-inf",
    "1\\2",
    "1\\2\\3\\4\\5\\6\\7",
    "0\\0\\0\\0\\0\\0",
    "-0",
    "99999999999999999999",
    "..",
    "/",
    "\u{0}",
];

/// Byte ranges `(start, end)` of tokens in a text.
type Spans = Vec<(usize, usize)>;

/// A seeded mutator: one case's mutations of one input.
pub struct Mutator {
    /// Its random stream.
    pub rng: Rng,
}

impl Mutator {
    /// The mutator of case `seed` of campaign `name`.
    pub fn new(name: &str, seed: u64) -> Self {
        Self {
            rng: Rng::new(name, seed),
        }
    }

    /// A position in `0..=len`, half the time within the first 512 bytes (where headers are).
    fn pos(&mut self, len: usize) -> usize {
        if self.rng.chance(0.5) {
            self.rng.below(len.min(512) + 1)
        } else {
            self.rng.below(len + 1)
        }
    }

    fn int_bytes(&mut self, width: usize) -> Vec<u8> {
        let v = if self.rng.chance(0.8) {
            *self.rng.pick(&INTS)
        } else {
            self.rng.next() as i64
        };
        // The low `width` bytes, in the file's byte order or (rarely) the other.
        if self.rng.chance(0.9) {
            v.to_le_bytes()[..width].to_vec()
        } else {
            v.to_be_bytes()[8 - width..].to_vec()
        }
    }

    fn float_bytes(&mut self, double: bool) -> Vec<u8> {
        let v = if self.rng.chance(0.85) {
            *self.rng.pick(&FLOATS)
        } else {
            f64::from_bits(self.rng.next())
        };
        let be = self.rng.chance(0.1);
        match (double, be) {
            (true, false) => v.to_le_bytes().to_vec(),
            (true, true) => v.to_be_bytes().to_vec(),
            (false, false) => (v as f32).to_le_bytes().to_vec(),
            (false, true) => (v as f32).to_be_bytes().to_vec(),
        }
    }

    fn overwrite(out: &mut [u8], at: usize, value: &[u8]) {
        for (k, &b) in value.iter().enumerate() {
            if let Some(slot) = out.get_mut(at + k) {
                *slot = b;
            }
        }
    }

    /// One field overwritten with an extreme value of its kind.
    fn field(&mut self, out: &mut [u8], f: Field) {
        let value = match f.kind {
            Kind::I16 => self.int_bytes(2),
            Kind::I32 => self.int_bytes(4),
            Kind::I64 => self.int_bytes(8),
            Kind::F32 => self.float_bytes(false),
            Kind::F64 => self.float_bytes(true),
            Kind::Text(n) => {
                let mut s = self.rng.pick(&STRINGS).as_bytes().to_vec();
                s.resize(n, b' ');
                s
            }
        };
        Self::overwrite(out, f.offset, &value);
    }

    /// `input` with 1 to 4 byte-level mutations: bit flips, bytes set to 0 / 0xff / other
    /// interesting values, `fields` (or random offsets) overwritten with extreme integers and
    /// floats, truncation, deletion, duplication, splicing from `donors`, repeated insertion
    /// and appended garbage.
    pub fn bytes(&mut self, input: &[u8], fields: &[Field], donors: &[&[u8]]) -> Vec<u8> {
        let mut out = input.to_vec();
        let n = 1 + self.rng.below(4);
        for _ in 0..n {
            self.byte_op(&mut out, fields, donors);
        }
        out
    }

    fn byte_op(&mut self, out: &mut Vec<u8>, fields: &[Field], donors: &[&[u8]]) {
        let len = out.len();
        match self.rng.below(12) {
            0 | 1 => {
                if len > 0 {
                    let p = self.pos(len - 1);
                    out[p] ^= 1 << self.rng.below(8);
                }
            }
            2 => {
                if len > 0 {
                    let p = self.pos(len - 1);
                    out[p] = *self
                        .rng
                        .pick(&[0u8, 0xff, 0x7f, 0x80, 1, 0xfe, b'0', b'\\']);
                }
            }
            3..=5 => {
                if !fields.is_empty() && self.rng.chance(0.8) {
                    let f = *self.rng.pick(fields);
                    self.field(out, f);
                } else if len > 0 {
                    let p = self.pos(len - 1);
                    let kind =
                        *self
                            .rng
                            .pick(&[Kind::I16, Kind::I32, Kind::I64, Kind::F32, Kind::F64]);
                    self.field(out, Field::at(p, kind));
                }
            }
            6 => {
                let p = self.pos(len);
                out.truncate(p);
            }
            7 => {
                if len > 0 {
                    let p = self.pos(len - 1);
                    let n = self.rng.len(len - p);
                    out.drain(p..p + n);
                }
            }
            8 => {
                // Duplicate a chunk somewhere else.
                if len > 0 {
                    let p = self.rng.below(len);
                    let n = self.rng.len((len - p).min(4096));
                    let chunk = out[p..p + n].to_vec();
                    let at = self.pos(len);
                    out.splice(at..at, chunk);
                }
            }
            9 => {
                // Splice from a donor (another input of the format), overwriting or inserting.
                let donor = if donors.is_empty() {
                    &out[..]
                } else {
                    *self.rng.pick(donors)
                };
                if !donor.is_empty() {
                    let p = self.rng.below(donor.len());
                    let n = self.rng.len((donor.len() - p).min(4096));
                    let chunk = donor[p..p + n].to_vec();
                    let at = self.pos(len);
                    if self.rng.chance(0.5) {
                        Self::overwrite(out, at, &chunk);
                    } else {
                        out.splice(at..at, chunk);
                    }
                }
            }
            10 => {
                // Repeated insertion of a short chunk.
                let chunk: Vec<u8> = if len > 0 && self.rng.chance(0.6) {
                    let p = self.rng.below(len);
                    let n = self.rng.len((len - p).min(16));
                    out[p..p + n].to_vec()
                } else {
                    let width = *self.rng.pick(&[1, 2, 4, 8]);
                    self.int_bytes(width)
                };
                let times = self.rng.len(1000);
                let at = self.pos(len);
                let block: Vec<u8> = chunk
                    .iter()
                    .copied()
                    .cycle()
                    .take(chunk.len() * times)
                    .collect();
                out.splice(at..at, block);
            }
            _ => {
                // Random bytes inserted or appended.
                let n = self.rng.len(256);
                let junk: Vec<u8> = (0..n).map(|_| self.rng.next() as u8).collect();
                let at = if self.rng.chance(0.5) {
                    len
                } else {
                    self.pos(len)
                };
                out.splice(at..at, junk);
            }
        }
    }

    /// `input` (text) with 1 to 3 text-level mutations (numbers and strings replaced by
    /// extreme tokens, lines deleted, duplicated, swapped or moved, keys exchanged, structural
    /// characters inserted, truncation), followed a third of the time by byte-level ones.
    pub fn text(&mut self, input: &str) -> Vec<u8> {
        let mut s = input.to_string();
        let n = 1 + self.rng.below(3);
        for _ in 0..n {
            s = self.text_op(&s);
        }
        let out = s.into_bytes();
        if self.rng.chance(0.33) {
            let n = 1 + self.rng.below(2);
            let mut out = out;
            for _ in 0..n {
                self.byte_op(&mut out, &[], &[]);
            }
            out
        } else {
            out
        }
    }

    /// `input` (JSON) with 1 to 3 structure-aware mutations: a value anywhere replaced by an
    /// extreme or ill-typed one (0, −1, u64::MAX, 1e300, null, "", "../x", [], {}…), an array
    /// element removed or duplicated, an object key removed, or a value copied from elsewhere
    /// in the document. Input that is not JSON gets [`Mutator::text`] instead.
    pub fn json(&mut self, input: &str) -> Vec<u8> {
        let Ok(mut v) = serde_json::from_str::<serde_json::Value>(input) else {
            return self.text(input);
        };
        let n = 1 + self.rng.below(3);
        for _ in 0..n {
            self.json_op(&mut v);
        }
        serde_json::to_vec_pretty(&v).unwrap_or_default()
    }

    /// `input` (JSON lines) with one line given [`Mutator::json`], and sometimes the lines
    /// shuffled by [`Mutator::text`] too.
    pub fn json_lines(&mut self, input: &str) -> Vec<u8> {
        let mut lines: Vec<String> = input.lines().map(String::from).collect();
        if !lines.is_empty() {
            let k = self.rng.below(lines.len());
            let mut v = self.json(&lines[k]);
            v.retain(|&b| b != b'\n');
            lines[k] = String::from_utf8_lossy(&v).into_owned();
        }
        let text = lines.join("\n") + "\n";
        if self.rng.chance(0.3) {
            self.text(&text)
        } else {
            text.into_bytes()
        }
    }

    fn json_op(&mut self, root: &mut serde_json::Value) {
        use serde_json::Value;
        fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
            match v {
                Value::Array(a) => {
                    for (k, x) in a.iter().enumerate() {
                        pointers(x, format!("{at}/{k}"), out);
                    }
                }
                Value::Object(o) => {
                    for (k, x) in o {
                        let key = k.replace('~', "~0").replace('/', "~1");
                        pointers(x, format!("{at}/{key}"), out);
                    }
                }
                _ => {}
            }
            out.push(at);
        }
        let mut all = Vec::new();
        pointers(root, String::new(), &mut all);
        let at = self.rng.pick(&all).clone();
        let from: &String = self.rng.pick(&all);
        let donor = root.pointer(from).cloned().unwrap_or(Value::Null);
        let extreme = || -> Vec<Value> {
            vec![
                Value::from(0),
                Value::from(-1),
                Value::from(1),
                Value::from(u64::MAX),
                Value::from(i64::MIN),
                Value::from(u32::MAX),
                Value::from(1e300),
                Value::from(-1e300),
                Value::from(0.5),
                Value::Null,
                Value::from(""),
                Value::from("../x"),
                Value::from("/"),
                Value::from("shard-00000.ctshard"),
                Value::Array(Vec::new()),
                Value::Object(Default::default()),
                Value::from(true),
            ]
        };
        // Mostly a value of the same type, so that the document still parses as its format
        // and the reader's own checks get the mutation.
        let numbers = [
            0i64,
            1,
            -1,
            2,
            3,
            7,
            1 << 31,
            u32::MAX as i64,
            i64::MAX,
            i64::MIN,
        ];
        let strings = [
            "",
            "../x",
            "/",
            "shard-00000.ctshard",
            "shard-00001.ctshard",
            "area",
            "x",
        ];
        let typed = self.rng.chance(0.7);
        let op = self.rng.below(6);
        let Some(node) = root.pointer_mut(&at) else {
            return;
        };
        match (op, node) {
            (0 | 1, node @ Value::Number(_)) if typed => {
                *node = if self.rng.chance(0.8) {
                    Value::from(*self.rng.pick(&numbers))
                } else {
                    Value::from(*self.rng.pick(&[0.5, 1e300, -0.0, 1.5]))
                }
            }
            (0 | 1, node @ Value::String(_)) if typed => {
                *node = Value::from(*self.rng.pick(&strings))
            }
            (0 | 1, node) => *node = self.rng.pick(&extreme()).clone(),
            (2, node) => *node = donor,
            (3, Value::Array(a)) if !a.is_empty() => {
                let k = self.rng.below(a.len());
                a.remove(k);
            }
            (4, Value::Array(a)) if !a.is_empty() => {
                let k = self.rng.below(a.len());
                let times = self.rng.len(20);
                for _ in 0..times {
                    a.insert(k, a[k].clone());
                }
            }
            (5, Value::Object(o)) if !o.is_empty() => {
                let k = self.rng.below(o.len());
                if let Some(key) = o.keys().nth(k).cloned() {
                    o.remove(&key);
                }
            }
            (_, node) => *node = self.rng.pick(&extreme()).clone(),
        }
    }

    /// Spans of `s` that are numbers, and spans that are quoted strings.
    fn tokens(s: &str) -> (Spans, Spans) {
        let b = s.as_bytes();
        let (mut numbers, mut strings) = (Vec::new(), Vec::new());
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if c == b'"' {
                let start = i;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                strings.push((start, (i + 1).min(b.len())));
                i += 1;
            } else if c.is_ascii_digit()
                || (c == b'-' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
            {
                let start = i;
                i += 1;
                while i < b.len() && (b[i].is_ascii_digit() || b"+-.eE_".contains(&b[i])) {
                    i += 1;
                }
                numbers.push((start, i));
            } else {
                i += 1;
            }
        }
        (numbers, strings)
    }

    fn text_op(&mut self, s: &str) -> String {
        let lines: Vec<&str> = s.split_inclusive('\n').collect();
        let (numbers, strings) = Self::tokens(s);
        let replace = |span: (usize, usize), with: &str| {
            let mut t = String::with_capacity(s.len() + with.len());
            t.push_str(&s[..span.0]);
            t.push_str(with);
            t.push_str(&s[span.1..]);
            t
        };
        match self.rng.below(10) {
            0..=2 if !numbers.is_empty() => {
                let span = *self.rng.pick(&numbers);
                let with = *self.rng.pick(&TOKENS);
                replace(span, with)
            }
            3 if !strings.is_empty() => {
                let span = *self.rng.pick(&strings);
                let with = if self.rng.chance(0.2) {
                    format!("\"{}\"", "x".repeat(self.rng.len(100_000)))
                } else if self.rng.chance(0.5) {
                    format!(
                        "\"{}\"",
                        self.rng
                            .pick(&STRINGS)
                            .replace('\\', "\\\\")
                            .replace('\0', "\\u0000")
                    )
                } else {
                    self.rng.pick(&TOKENS).to_string()
                };
                replace(span, &with)
            }
            4 if !lines.is_empty() => {
                let k = self.rng.below(lines.len());
                let mut l = lines.clone();
                l.remove(k);
                l.concat()
            }
            5 if !lines.is_empty() => {
                let k = self.rng.below(lines.len());
                let times = self.rng.len(50);
                let mut l = lines.clone();
                for _ in 0..times {
                    l.insert(k, lines[k]);
                }
                l.concat()
            }
            6 if lines.len() > 1 => {
                let (a, b) = (self.rng.below(lines.len()), self.rng.below(lines.len()));
                let mut l = lines.clone();
                l.swap(a, b);
                l.concat()
            }
            7 if strings.len() > 1 => {
                // A key or value exchanged with another one of the file.
                let a = *self.rng.pick(&strings);
                let b = *self.rng.pick(&strings);
                replace(a, &s[b.0..b.1])
            }
            8 => {
                let p = self.rng.below(s.len() + 1);
                let p = (0..=p).rev().find(|&q| s.is_char_boundary(q)).unwrap_or(0);
                let c = *self.rng.pick(&[
                    "\"", "[", "]", "{", "}", ",", "\n", "=", "#", ":", "\\", "'", "\u{fffd}", "é",
                ]);
                let mut t = s.to_string();
                t.insert_str(p, c);
                t
            }
            _ => {
                let p = self.rng.below(s.len() + 1);
                let p = (0..=p).rev().find(|&q| s.is_char_boundary(q)).unwrap_or(0);
                s[..p].to_string()
            }
        }
    }
}

/// The CRC-32 of `bytes[..len − 4]` written into its last 4 bytes (little-endian), as shards and
/// checkpoints store it, so that a mutated file gets past the checksum to the fields behind it.
pub fn fix_crc(bytes: &mut [u8]) {
    if bytes.len() >= 4 {
        let n = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..n]);
        bytes[n..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// How many cases a campaign runs: `CTSEG_FUZZ_CASES`, else `default`.
fn cases(default: u64) -> u64 {
    std::env::var("CTSEG_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// One fuzz campaign: `default_cases` seeded cases (and every regression input) of the format
/// that `test` (the name of the calling `#[test]` function) fuzzes. In the parent, runs the
/// child and judges it; in the child, calls `setup` once, then `case` for each regression input
/// (`Err(index)`) and each seed (`Ok(seed)`).
pub fn campaign<T>(
    test: &str,
    default_cases: u64,
    setup: impl FnOnce(&std::path::Path) -> T,
    regressions: usize,
    case: impl Fn(&T, &std::path::Path, Result<u64, usize>),
) {
    if std::env::var("CTSEG_FUZZ_CHILD").as_deref() == Ok(test) {
        child(test, setup, regressions, case);
    } else {
        parent(test, default_cases, regressions);
    }
}

fn child<T>(
    test: &str,
    setup: impl FnOnce(&std::path::Path) -> T,
    regressions: usize,
    case: impl Fn(&T, &std::path::Path, Result<u64, usize>),
) {
    let (from, to) = (
        env_u64("CTSEG_FUZZ_FROM").unwrap_or(0),
        env_u64("CTSEG_FUZZ_TO").unwrap_or(0),
    );
    let dir = std::path::PathBuf::from(std::env::var("CTSEG_FUZZ_DIR").expect("CTSEG_FUZZ_DIR"));
    let state = setup(&dir);
    let work = dir.join("case");
    LIMIT.store(ALLOCATION_BOUND, Ordering::Relaxed);
    // The panic hook prints each panic's message; the seed line before it says whose.
    let mut failed: Vec<String> = Vec::new();
    let all_regressions = env_u64("CTSEG_FUZZ_SEED").is_none();
    let ids = (0..if all_regressions { regressions } else { 0 })
        .map(Err)
        .chain((from..to).map(Ok));
    for id in ids {
        let label = match id {
            Ok(seed) => format!("seed {seed}"),
            Err(k) => format!("regression {k}"),
        };
        eprintln!("fuzz-case {test} {label}");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).expect("case dir");
        let refused_before = OUTCOMES[1].load(Ordering::Relaxed);
        if catch_unwind(AssertUnwindSafe(|| case(&state, &work, id))).is_err() {
            eprintln!("fuzz-panic {test} {label}");
            // Kept: some inputs (checkpoints, whose records carry burn's random parameter ids)
            // differ between runs, so a seed alone may not reproduce the case.
            let _ = std::fs::rename(
                &work,
                dir.join(format!("failed-{}", label.replace(' ', "-"))),
            );
            failed.push(label);
        } else if id.is_err() && OUTCOMES[1].load(Ordering::Relaxed) == refused_before {
            // A regression input is a corrupt file: some reader on its way must refuse it.
            eprintln!("fuzz-panic {test} {label}: read without an error");
            failed.push(label);
        }
    }
    LIMIT.store(usize::MAX, Ordering::Relaxed);
    eprintln!(
        "fuzz-stats {} {}",
        OUTCOMES[0].load(Ordering::Relaxed),
        OUTCOMES[1].load(Ordering::Relaxed)
    );
    assert!(failed.is_empty(), "{test}: panics at {}", failed.join(", "));
}

fn parent(test: &str, default_cases: u64, regressions: usize) {
    let (from, to) = match env_u64("CTSEG_FUZZ_SEED") {
        Some(s) => (s, s + 1),
        None => {
            let start = env_u64("CTSEG_FUZZ_START").unwrap_or(0);
            (start, start + cases(default_cases))
        }
    };
    let n = to - from;
    // Generous: the default campaigns take seconds; a hang is what this catches.
    let timeout = Duration::from_secs(120 + n / 10);
    let exe = std::env::current_exe().expect("test binary");
    // The child's files; kept when it fails, for a look at the case that failed.
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let mut child = Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env("CTSEG_FUZZ_CHILD", test)
        .env("CTSEG_FUZZ_DIR", dir.path())
        .env("CTSEG_FUZZ_FROM", from.to_string())
        .env("CTSEG_FUZZ_TO", to.to_string())
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the fuzz child");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = reader.join().unwrap_or_default();
    let secs = started.elapsed().as_secs_f64();
    // The case the child started last: where it died or hung.
    let last_case = |log: &str| -> String {
        log.lines()
            .filter_map(|l| l.strip_prefix(&format!("fuzz-case {test} ")))
            .next_back()
            .unwrap_or("setup")
            .to_string()
    };
    let reproduce = |label: &str| match label.strip_prefix("seed ") {
        Some(seed) => format!(
            "CTSEG_FUZZ_SEED={seed} cargo test --release --features mpi,test-hooks --test fuzz {test}"
        ),
        None => {
            format!("cargo test --release --features mpi,test-hooks --test fuzz {test} ({label})")
        }
    };
    if std::env::var_os("CTSEG_FUZZ_VERBOSE").is_some() {
        eprintln!("{log}");
    }
    let detail: Vec<&str> = log
        .lines()
        .filter(|l| !l.starts_with("fuzz-case "))
        .collect();
    let mut tail = detail[detail.len().saturating_sub(60)..].join("\n");
    if status.as_ref().is_none_or(|st| !st.success()) {
        let kept = dir.keep();
        tail.push_str(&format!(
            "\n(the files of each case that panicked are in {}/failed-*, the last case's in {})",
            kept.display(),
            kept.join("case").display()
        ));
    }
    match status {
        Some(st) if st.success() => {
            let stats: Vec<u64> = log
                .lines()
                .find_map(|l| l.strip_prefix("fuzz-stats "))
                .map(|l| l.split(' ').filter_map(|v| v.parse().ok()).collect())
                .unwrap_or_default();
            println!(
                "fuzz {test}: {n} cases (seeds {from}..{to}) and {} regression inputs in {secs:.1} s; reads: {} ok, {} refused with an error",
                if env_u64("CTSEG_FUZZ_SEED").is_some() {
                    0
                } else {
                    regressions
                },
                stats.first().unwrap_or(&0),
                stats.get(1).unwrap_or(&0)
            );
        }
        Some(st) => {
            let panics: Vec<&str> = log
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("fuzz-panic {test} ")))
                .map(|l| l.split(':').next().unwrap_or(l))
                .collect();
            if panics.is_empty() {
                let last = last_case(&log);
                panic!(
                    "{test}: the fuzz child died ({st}) at {last}; reproduce with {}\n{tail}",
                    reproduce(&last)
                );
            }
            let how: Vec<String> = panics.iter().take(10).map(|p| reproduce(p)).collect();
            panic!(
                "{test}: {} case(s) panicked: {}\nreproduce with:\n{}\n{tail}",
                panics.len(),
                panics.join(", "),
                how.join("\n")
            );
        }
        None => {
            let last = last_case(&log);
            panic!(
                "{test}: the fuzz child ran past {}s and was killed at {last} (a hang?); reproduce with {}\n{tail}",
                timeout.as_secs(),
                reproduce(&last)
            );
        }
    }
}
