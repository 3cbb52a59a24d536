//! Every reader of untrusted bytes, fuzzed: seeded mutations of the real fixtures (NIfTI `.nii`
//! and `.nii.gz`, DICOM series, shards and the dataset manifest, checkpoints, run configs, CSV
//! case lists, `metrics.jsonl`, `summary.json`). Each reader must return `Ok` or a clean error
//! naming its file on every mutation: never panic, abort, hang or allocate beyond
//! [`fuzz::ALLOCATION_BOUND`] at once. Each format runs in a child process (tests/common/fuzz.rs
//! says how, and how to reproduce a seed); each crash the suite found is kept below as a
//! regression input, run before the seeds.

mod common;

use std::path::{Path, PathBuf};

use common::fuzz::{self, Field, Kind, Mutator, campaign, fix_crc};
use common::{gunzip, gzip};
use ctseg::data::prepare::{self, PrepareOptions, Resize};
use ctseg::data::{Dataset, dicom, nifti, shard::ShardData};
use ctseg::rundir::{self, Checkpoint, CheckpointKind, Summary};

#[global_allocator]
static ALLOCATOR: fuzz::BoundedAllocator = fuzz::BoundedAllocator;

/// Inputs that crashed a reader once, each with what it did, built from a campaign's fixtures.
type Regressions<S, T> = &'static [(&'static str, fn(&S) -> T)];

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read fixture")
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write case");
}

/// A reader's result judged: `Ok` passes; an error must name `name` (the file or folder read).
fn clean<T>(what: &str, name: &str, r: ctseg::Result<T>) -> Option<T> {
    fuzz::record(r.is_ok());
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            let text = e.to_string();
            if std::env::var_os("CTSEG_FUZZ_VERBOSE").is_some() {
                eprintln!("fuzz-refused {what}: {text}");
            }
            assert!(
                text.contains(name),
                "{what}: the error does not name {name}: {text}"
            );
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NIfTI

/// The NIfTI-1 header fields (nifti1.h offsets): sizeof_hdr, dim[0..8], datatype, bitpix,
/// pixdim[0..8], vox_offset, scl_slope, scl_inter, qform_code, sform_code, quatern b/c/d,
/// qoffset x/y/z, srow_x/y/z, magic, the extension flag and a first extension's esize/ecode.
fn nifti_fields() -> Vec<Field> {
    let mut f = vec![Field::at(0, Kind::I32)];
    f.extend((0..8).map(|k| Field::at(40 + 2 * k, Kind::I16)));
    f.extend([Field::at(70, Kind::I16), Field::at(72, Kind::I16)]);
    f.extend((0..8).map(|k| Field::at(76 + 4 * k, Kind::F32)));
    f.extend([108, 112, 116].map(|o| Field::at(o, Kind::F32)));
    f.extend([Field::at(252, Kind::I16), Field::at(254, Kind::I16)]);
    f.extend((0..18).map(|k| Field::at(256 + 4 * k, Kind::F32)));
    f.extend([
        Field::at(344, Kind::Text(4)),
        Field::at(348, Kind::I32),
        Field::at(352, Kind::I32),
        Field::at(356, Kind::I32),
    ]);
    f
}

/// Inserts a header extension (esize, ecode, payload) at 352, with vox_offset moved past it
/// or not, esize and payload extreme or not.
fn add_extension(m: &mut Mutator, b: &mut Vec<u8>) {
    if b.len() < 352 {
        return;
    }
    b[348] = 1;
    let payload = m.rng.len(300);
    let esize: i32 = if m.rng.chance(0.5) {
        (8 + payload as i32 + 15) / 16 * 16
    } else {
        *m.rng.pick(&[0, -16, 7, i32::MAX, i32::MIN, 16, 1 << 30])
    };
    let mut ext = esize.to_le_bytes().to_vec();
    ext.extend_from_slice(&(*m.rng.pick(&[4i32, 6, 0, -1, i32::MAX])).to_le_bytes());
    ext.extend((0..payload).map(|_| m.rng.next() as u8));
    let grow = ext.len();
    b.splice(352..352, ext);
    if m.rng.chance(0.7) {
        let off = f32::from_le_bytes([b[108], b[109], b[110], b[111]]);
        b[108..112].copy_from_slice(&(off + grow as f32).to_le_bytes());
    }
}

/// What `prepare` and `predict` do with a volume after reading it: canonical layout, label
/// values, one resized slice.
fn use_volume(v: &nifti::Volume) {
    let name = v
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(c) = clean("to_canonical", &name, nifti::to_canonical(v)) {
        let z = c.slices / 2;
        let px = c.rows * c.cols;
        let slice = &c.data[z * px..(z + 1) * px];
        for mode in [Resize::Nearest, Resize::Area] {
            let out = prepare::resize_image(slice, c.rows, c.cols, 16, mode);
            assert_eq!(out.len(), 256);
        }
    }
    let _ = prepare::label_values(v);
}

struct NiftiState {
    ct: Vec<u8>,
    liver: Vec<u8>,
    ct_gz: Vec<u8>,
    liver_gz: Vec<u8>,
    fields: Vec<Field>,
}

fn nifti_state(_: &Path) -> NiftiState {
    let ct_gz = read(&common::fixture("nifti/example_ct_sm.nii.gz"));
    let liver_gz = read(&common::fixture("nifti/liver.nii.gz"));
    NiftiState {
        ct: gunzip(&ct_gz),
        liver: gunzip(&liver_gz),
        ct_gz,
        liver_gz,
        fields: nifti_fields(),
    }
}

fn set(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

/// Crashes found before the fuzz suite existed, and by it, as minimal inputs.
const NIFTI_REGRESSIONS: Regressions<NiftiState, Vec<u8>> = &[
    ("vox_offset 1e20: a capacity overflow panic", |s| {
        let mut b = s.liver.clone();
        set(&mut b, 108, &1e20f32.to_le_bytes());
        b
    }),
    ("dims 32767³ in 400 bytes: a 70 TB allocation", |s| {
        let mut b = s.liver[..400].to_vec();
        for k in 1..=3 {
            set(&mut b, 40 + 2 * k, &i16::MAX.to_le_bytes());
        }
        b
    }),
    (
        "dims 2000×1000×1000 in 400 bytes: a 2 GB allocation",
        |s| {
            let mut b = s.liver[..400].to_vec();
            for (k, d) in [2000i16, 1000, 1000].iter().enumerate() {
                set(&mut b, 42 + 2 * k, &d.to_le_bytes());
            }
            b
        },
    ),
];

#[test]
fn nifti_reader_survives_mutations() {
    campaign(
        "nifti_reader_survives_mutations",
        5000,
        nifti_state,
        NIFTI_REGRESSIONS.len(),
        |s, dir, id| {
            let bytes = match id {
                Err(k) => (NIFTI_REGRESSIONS[k].1)(s),
                Ok(seed) => {
                    let mut m = Mutator::new("nifti", seed);
                    let (base, other) = if m.rng.chance(0.7) {
                        (&s.liver, &s.ct)
                    } else {
                        (&s.ct, &s.liver)
                    };
                    let mut b = m.bytes(base, &s.fields, &[&other[..400]]);
                    if m.rng.chance(0.2) {
                        add_extension(&mut m, &mut b);
                    }
                    b
                }
            };
            let f = dir.join("case.nii");
            write(&f, &bytes);
            if let Some(v) = clean("nifti::read", "case.nii", nifti::read(&f)) {
                use_volume(&v);
            }
            let _ = clean("read_header", "case.nii", nifti::read_header(&f));
            // One case in ten goes through `prepare` with the real label.
            if id.is_ok_and(|seed| seed % 10 == 0) {
                let label = dir.join("label.nii.gz");
                write(&label, &s.liver_gz);
                let csv = dir.join("pairs.csv");
                write(&csv, b"case.nii,label.nii.gz\n");
                let out = dir.join("ds");
                let opts = PrepareOptions {
                    input: csv,
                    out: out.clone(),
                    size: 16,
                    folds: 1,
                    margin: 1,
                    resize: Resize::Area,
                    per_shard: 64,
                    seed: 1,
                    quiet: true,
                };
                if prepare::prepare(&opts).is_ok() {
                    let _ = clean("Dataset::open", "ds", Dataset::open(&out));
                }
            }
        },
    );
}

/// The gzip header (magic, method, flags, mtime, OS) and trailer (CRC-32, ISIZE) of `gz`.
fn gzip_fields(gz: &[u8]) -> Vec<Field> {
    let n = gz.len();
    vec![
        Field::at(0, Kind::Text(2)),
        Field::at(2, Kind::I16),
        Field::at(4, Kind::I32),
        Field::at(8, Kind::I16),
        Field::at(n - 8, Kind::I32),
        Field::at(n - 4, Kind::I32),
    ]
}

#[test]
fn nifti_gz_reader_survives_mutations() {
    campaign(
        "nifti_gz_reader_survives_mutations",
        5000,
        nifti_state,
        NIFTI_REGRESSIONS.len(),
        |s, dir, id| {
            let bytes = match id {
                Err(k) => gzip(&(NIFTI_REGRESSIONS[k].1)(s)),
                Ok(seed) => {
                    let mut m = Mutator::new("nifti_gz", seed);
                    let (raw, gz) = if m.rng.chance(0.85) {
                        (&s.liver, &s.liver_gz)
                    } else {
                        (&s.ct, &s.ct_gz)
                    };
                    match m.rng.below(10) {
                        // The compressed bytes themselves: gzip header, deflate data, trailer.
                        0..=4 => m.bytes(gz, &gzip_fields(gz), &[&s.liver_gz[..]]),
                        // The NIfTI bytes, compressed correctly.
                        5..=7 => {
                            let mut b = m.bytes(raw, &s.fields, &[]);
                            if m.rng.chance(0.2) {
                                add_extension(&mut m, &mut b);
                            }
                            gzip(&b)
                        }
                        // Several gzip members (as bgzip writes), one of them mutated.
                        _ => {
                            let cuts = 1 + m.rng.below(3);
                            let mut at: Vec<usize> =
                                (0..cuts).map(|_| m.rng.below(raw.len() + 1)).collect();
                            at.push(0);
                            at.push(raw.len());
                            at.sort_unstable();
                            let members: Vec<Vec<u8>> =
                                at.windows(2).map(|w| gzip(&raw[w[0]..w[1]])).collect();
                            let bad = m.rng.below(members.len());
                            members
                                .iter()
                                .enumerate()
                                .flat_map(|(k, g)| {
                                    if k == bad {
                                        m.bytes(g, &gzip_fields(g), &[])
                                    } else {
                                        g.clone()
                                    }
                                })
                                .collect()
                        }
                    }
                }
            };
            let f = dir.join("case.nii.gz");
            write(&f, &bytes);
            if let Some(v) = clean("nifti::read", "case.nii.gz", nifti::read(&f)) {
                use_volume(&v);
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// DICOM

/// Length fields and short values of an explicit VR little-endian DICOM file (the fixtures'
/// encoding), found by walking its element headers; and the SIZ fields of a JPEG 2000
/// codestream in it.
fn dicom_fields(b: &[u8]) -> Vec<Field> {
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) as usize;
    let mut out = Vec::new();
    let mut o = 132;
    while o + 8 <= b.len() {
        if u16_at(o) == 0xfffe {
            out.push(Field::at(o + 4, Kind::I32));
            let len = u32_at(o + 4);
            let holds_elements = b
                .get(o + 12..o + 14)
                .is_some_and(|vr| vr.iter().all(u8::is_ascii_uppercase));
            o += 8;
            if len != 0xffff_ffff && !holds_elements {
                o += len; // a pixel data fragment
            }
            continue;
        }
        out.push(Field::at(o + 4, Kind::Text(2)));
        let vr = &b[o + 4..o + 6];
        let long = matches!(
            vr,
            b"OB"
                | b"OW"
                | b"OF"
                | b"OD"
                | b"OL"
                | b"OV"
                | b"SQ"
                | b"SV"
                | b"UC"
                | b"UN"
                | b"UR"
                | b"UT"
                | b"UV"
        );
        let (len, value) = if long {
            if o + 12 > b.len() {
                break;
            }
            out.push(Field::at(o + 8, Kind::I32));
            (u32_at(o + 8), o + 12)
        } else {
            out.push(Field::at(o + 6, Kind::I16));
            (u16_at(o + 6), o + 8)
        };
        if len == 0xffff_ffff {
            o = value;
            continue;
        }
        match vr {
            b"US" | b"SS" => out.push(Field::at(value, Kind::I16)),
            b"UL" | b"SL" => out.push(Field::at(value, Kind::I32)),
            b"FL" => out.push(Field::at(value, Kind::F32)),
            b"FD" => out.push(Field::at(value, Kind::F64)),
            b"DS" | b"IS" | b"UI" | b"CS" => out.push(Field::at(value, Kind::Text(len))),
            _ => {}
        }
        o = if vr == b"SQ" { value } else { value + len };
    }
    // JPEG 2000 SIZ marker (FF51): Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz,
    // YTOsiz, Csiz, then per component Ssiz, XRsiz, YRsiz; and COD (FF52).
    if let Some(m) = b.windows(2).position(|w| w == [0xff, 0x51]) {
        out.extend([2, 4].map(|k| Field::at(m + k, Kind::I16)));
        out.extend((0..8).map(|k| Field::at(m + 6 + 4 * k, Kind::I32)));
        out.extend([38, 40].map(|k| Field::at(m + k, Kind::I16)));
    }
    if let Some(m) = b.windows(2).position(|w| w == [0xff, 0x52]) {
        out.extend((2..12).step_by(2).map(|k| Field::at(m + k, Kind::I16)));
    }
    out
}

struct DicomState {
    /// Three slices of CT_small, 1 mm apart.
    series: Vec<Vec<u8>>,
    series_fields: Vec<Field>,
    uncompressed: Vec<u8>,
    uncompressed_fields: Vec<Field>,
    j2k: Vec<u8>,
    j2k_fields: Vec<Field>,
}

fn dicom_state(dir: &Path) -> DicomState {
    use dicom_core::VR;
    use dicom_dictionary_std::tags;
    let series: Vec<Vec<u8>> = (0..3)
        .map(|k| {
            let mut obj =
                dicom_object::open_file(common::fixture("dicom/CT_small.dcm")).expect("open");
            obj.put_str(
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                format!("-158.135803\\-179.035797\\{}", -75.699997 + k as f64),
            );
            let p = dir.join(format!("s{k}.dcm"));
            obj.write_to_file(&p).expect("write");
            read(&p)
        })
        .collect();
    let uncompressed = read(&common::fixture("dicom/ts_slice_uncompressed.dcm"));
    let j2k = read(&common::fixture("dicom/ts_slice_j2k.dcm"));
    DicomState {
        series_fields: dicom_fields(&series[0]),
        uncompressed_fields: dicom_fields(&uncompressed),
        j2k_fields: dicom_fields(&j2k),
        series,
        uncompressed,
        j2k,
    }
}

/// The offset of the value of the first element `tag` (group, element) with VR `vr` in an
/// explicit VR little-endian file.
fn value_at(b: &[u8], tag: (u16, u16), vr: &[u8; 2]) -> usize {
    let mut pat = tag.0.to_le_bytes().to_vec();
    pat.extend_from_slice(&tag.1.to_le_bytes());
    pat.extend_from_slice(vr);
    let at = b
        .windows(6)
        .position(|w| w == pat)
        .expect("element in the fixture");
    at + if matches!(vr, b"OB" | b"OW" | b"SQ") {
        12
    } else {
        8
    }
}

/// Crashes the fuzz suite found in the DICOM reader, as minimal inputs (one-file series).
const DICOM_REGRESSIONS: Regressions<DicomState, Vec<Vec<u8>>> = &[
    (
        "PixelData claiming 1.4 GB in a 39 KB file: the parser reserved it",
        |s| {
            let mut b = s.series[0].clone();
            let v = value_at(&b, (0x7fe0, 0x0010), b"OW");
            set(&mut b, v - 4, &1_397_572_935u32.to_le_bytes());
            vec![b]
        },
    ),
    ("BitsStored 0: an assertion in the pixel decoder", |s| {
        let mut b = s.series[0].clone();
        let v = value_at(&b, (0x0028, 0x0101), b"US");
        set(&mut b, v, &0u16.to_le_bytes());
        vec![b]
    }),
    (
        "5000 nested sequences of undefined length before the pixel data",
        |s| {
            let mut b = s.series[0].clone();
            let at = value_at(&b, (0x7fe0, 0x0010), b"OW") - 12;
            let mut nest = Vec::new();
            for _ in 0..5000 {
                // (0008,1140) SQ, undefined length, then an item of undefined length.
                nest.extend_from_slice(&[
                    0x08, 0x00, 0x40, 0x11, b'S', b'Q', 0, 0, 0xff, 0xff, 0xff, 0xff,
                ]);
                nest.extend_from_slice(&[0xfe, 0xff, 0x00, 0xe0, 0xff, 0xff, 0xff, 0xff]);
            }
            b.splice(at..at, nest);
            vec![b]
        },
    ),
];

#[test]
fn dicom_reader_survives_mutations() {
    campaign(
        "dicom_reader_survives_mutations",
        5000,
        dicom_state,
        DICOM_REGRESSIONS.len(),
        |s, dir, id| {
            let files: Vec<Vec<u8>> = match id {
                Err(k) => (DICOM_REGRESSIONS[k].1)(s),
                Ok(seed) => {
                    let mut m = Mutator::new("dicom", seed);
                    match m.rng.below(10) {
                        0..=6 => {
                            // One file of a three-slice series.
                            let k = m.rng.below(3);
                            let mut files = s.series.clone();
                            files[k] =
                                m.bytes(&s.series[k], &s.series_fields, &[&s.uncompressed[..2048]]);
                            files
                        }
                        7 | 8 => vec![m.bytes(
                            &s.uncompressed,
                            &s.uncompressed_fields,
                            &[&s.series[0][..]],
                        )],
                        _ => vec![m.bytes(&s.j2k, &s.j2k_fields, &[&s.uncompressed[..2048]])],
                    }
                }
            };
            let series = dir.join("series");
            std::fs::create_dir_all(&series).expect("mkdir");
            for (k, b) in files.iter().enumerate() {
                write(&series.join(format!("{k}.dcm")), b);
            }
            if let Some(v) = clean("dicom::read_series", "series", dicom::read_series(&series)) {
                use_volume(&v);
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Shards and the dataset manifest

struct DatasetState {
    shard: Vec<u8>,
    manifest: String,
    /// The other files of the dataset: (name, bytes).
    files: Vec<(String, Vec<u8>)>,
}

/// A phantom dataset of two volumes in two folds, 3 slices each at 32², in shards of 4 slices.
fn dataset_state(dir: &Path) -> DatasetState {
    let mut ds = Dataset::phantom(1, 2, 3, 32, 1);
    ds.folds = [(0, 0), (1, 1)].into_iter().collect();
    let out = dir.join("ds");
    ds.write(&out, 4, "fuzz fixture").expect("write dataset");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&out)
        .expect("ls")
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                read(&e.path()),
            )
        })
        .collect();
    files.sort();
    DatasetState {
        shard: read(&out.join("shard-00000.ctshard")),
        manifest: std::fs::read_to_string(out.join("dataset.json")).expect("manifest"),
        files,
    }
}

/// The dataset with `name` replaced by `bytes`, written to `dir/ds`, opened and split as
/// training does.
fn open_dataset(s: &DatasetState, dir: &Path, name: &str, bytes: &[u8]) {
    let ds_dir = dir.join("ds");
    std::fs::create_dir_all(&ds_dir).expect("mkdir");
    for (n, b) in &s.files {
        write(&ds_dir.join(n), if n == name { bytes } else { b });
    }
    if let Some(ds) = clean("Dataset::open", "ds", Dataset::open(&ds_dir)) {
        let _ = ds.split_by_volume(0.5, 1);
        let _ = ds.split_by_fold(0);
        let _ = ds.split_by_fold(usize::MAX);
        for i in 0..ds.len() {
            assert_eq!(ds.image(i).len(), ds.pixels());
        }
    }
}

/// Shard header fields: version, header bytes, height, width, count, flags, and the first
/// slice's volume id and index.
const SHARD_FIELDS: [Field; 8] = [
    Field::at(8, Kind::I32),
    Field::at(12, Kind::I32),
    Field::at(16, Kind::I32),
    Field::at(20, Kind::I32),
    Field::at(24, Kind::I32),
    Field::at(28, Kind::I32),
    Field::at(32, Kind::I32),
    Field::at(36, Kind::I32),
];

const SHARD_REGRESSIONS: Regressions<DatasetState, Vec<u8>> = &[(
    "h·w·3 wrapping to 13 bytes: a slicing panic behind a valid CRC",
    |_| {
        let mut b = b"CTSHARD\0".to_vec();
        for v in [1u32, 32, 3_633_886_365, 3_384_208_571, 1, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.resize(57, 0);
        fix_crc(&mut b);
        b
    },
)];

#[test]
fn shard_reader_survives_mutations() {
    campaign(
        "shard_reader_survives_mutations",
        5000,
        dataset_state,
        SHARD_REGRESSIONS.len(),
        |s, dir, id| {
            let bytes = match id {
                Err(k) => (SHARD_REGRESSIONS[k].1)(s),
                Ok(seed) => {
                    let mut m = Mutator::new("shard", seed);
                    let mut b = m.bytes(&s.shard, &SHARD_FIELDS, &[]);
                    // Most cases get a valid checksum, to reach the fields behind it.
                    if m.rng.chance(0.8) {
                        fix_crc(&mut b);
                    }
                    b
                }
            };
            let _ = clean(
                "ShardData::from_bytes",
                "x.ctshard",
                ShardData::from_bytes(&bytes, Path::new("x.ctshard")),
            );
            open_dataset(s, dir, "shard-00000.ctshard", &bytes);
        },
    );
}

#[test]
fn manifest_reader_survives_mutations() {
    campaign(
        "manifest_reader_survives_mutations",
        5000,
        dataset_state,
        0,
        |s, dir, id| {
            let seed = id.unwrap_or_default();
            let mut m = Mutator::new("manifest", seed);
            let bytes = if m.rng.chance(0.6) {
                m.json(&s.manifest)
            } else {
                m.text(&s.manifest)
            };
            open_dataset(s, dir, "dataset.json", &bytes);
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

/// A run of `tests/fixtures/tiny.toml` for 2 steps, by the real binary, in `dir/run`.
fn tiny_run(dir: &Path) -> PathBuf {
    let run = dir.join("run");
    common::ok(common::ctseg(&[
        "train",
        "--config",
        common::TINY,
        "--max-steps",
        "2",
        "--threads",
        "1",
        "--quiet",
        "--out",
        common::s(&run),
    ]));
    run
}

struct CheckpointState {
    bytes: Vec<u8>,
    /// Meta JSON, model burnpack, optimiser burnpack.
    parts: [Vec<u8>; 3],
    fields: Vec<Field>,
    backend: ctseg::backend::Backend,
}

/// The checkpoint's container: magic, version, three (length, bytes) sections, CRC-32.
fn assemble(parts: &[Vec<u8>; 3]) -> Vec<u8> {
    let mut b = b"CTSEGCK\0".to_vec();
    b.extend_from_slice(&1u32.to_le_bytes());
    for p in parts {
        b.extend_from_slice(&(p.len() as u64).to_le_bytes());
        b.extend_from_slice(p);
    }
    b.extend_from_slice(&[0; 4]);
    fix_crc(&mut b);
    b
}

fn checkpoint_state(dir: &Path) -> CheckpointState {
    let run = tiny_run(dir);
    let ck = Checkpoint::load(&run.join(rundir::CHECKPOINT)).expect("checkpoint");
    let meta = serde_json::to_vec(&ck.meta).expect("meta");
    let parts = [meta, ck.model, ck.optimizer];
    let bytes = assemble(&parts);
    // The section lengths, and the first bytes of each section.
    let mut fields = vec![Field::at(0, Kind::Text(8)), Field::at(8, Kind::I32)];
    let mut o = 12;
    for p in &parts {
        fields.push(Field::at(o, Kind::I64));
        fields.extend((0..8).map(|k| Field::at(o + 8 + 4 * k, Kind::I32)));
        o += 8 + p.len();
    }
    let backend = ctseg::backend::open(&ctseg::backend::DeviceRequest {
        kind: ctseg::backend::BackendKind::Cpu,
        threads: 1,
        adapter: None,
        gpu_conv: Default::default(),
        cooperative_matrices: true,
    })
    .expect("cpu backend");
    CheckpointState {
        bytes,
        parts,
        fields,
        backend,
    }
}

/// The meta JSON with its embedded run config mutated as TOML text.
fn mutate_embedded_config(m: &mut Mutator, meta: &[u8]) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(meta).expect("meta json");
    if let Some(toml) = v["config_toml"].as_str() {
        let mutated = String::from_utf8_lossy(&m.text(toml)).into_owned();
        v["config_toml"] = serde_json::Value::String(mutated);
    }
    serde_json::to_vec(&v).expect("meta json")
}

/// The checkpoint with its optimiser record rewritten: `edit(k, tensor, scalars)` for each
/// state tensor `k` (and the record's scalars, to change in place).
fn rewrite_optimiser(
    s: &CheckpointState,
    edit: impl Fn(
        usize,
        burn_pack::Tensor,
        &mut std::collections::BTreeMap<String, burn_pack::Scalar>,
    ) -> burn_pack::Tensor,
) -> Vec<u8> {
    use burn_pack::{Bytes, Reader, Writer};
    let reader = Reader::from_bytes(Bytes::from_bytes_vec(s.parts[2].clone())).expect("record");
    let mut scalars = reader.scalars().clone();
    let metadata = reader.metadata().clone();
    let tensors = reader
        .into_tensors()
        .expect("tensors")
        .into_iter()
        .enumerate()
        .map(|(k, t)| edit(k, t, &mut scalars))
        .collect();
    let mut w = Writer::new(tensors);
    for (k, v) in &scalars {
        w = w.with_scalar(k, *v);
    }
    for (k, v) in &metadata {
        w = w.with_metadata(k, v);
    }
    let mut parts = s.parts.clone();
    parts[2] = w.into_bytes().expect("record").to_vec();
    assemble(&parts)
}

/// Crashes the fuzz suite found in the checkpoint readers, as minimal inputs.
const CHECKPOINT_REGRESSIONS: Regressions<CheckpointState, Vec<u8>> = &[
    (
        "an optimiser state tensor without a parameter id: an assertion in burn",
        |s| {
            rewrite_optimiser(s, |k, t, _| {
                let (name, dtype, shape, id, bytes) = t.into_parts().expect("parts");
                burn_pack::Tensor::new(name, dtype, shape, if k == 0 { None } else { id }, bytes)
            })
        },
    ),
    (
        "an optimiser parameter rank of 9: burn's rank dispatch panics",
        |s| {
            rewrite_optimiser(s, |_, t, scalars| {
                if let Some(key) = scalars.keys().find(|k| k.ends_with(".__rank")).cloned() {
                    scalars.insert(key, burn_pack::Scalar::UInt(9));
                }
                t
            })
        },
    ),
    (
        "an optimiser state tensor of another rank than its parameter: a panic creating it",
        |s| {
            rewrite_optimiser(s, |k, t, _| {
                let (name, dtype, shape, id, bytes) = t.into_parts().expect("parts");
                let mut dims = shape.as_slice().to_vec();
                if k == 0 {
                    dims.push(1);
                }
                burn_pack::Tensor::new(name, dtype, dims, id, bytes)
            })
        },
    ),
    (
        "a run config of width 65536: terabytes of weights built before loading",
        |s| {
            let mut meta: serde_json::Value = serde_json::from_slice(&s.parts[0]).expect("meta");
            let toml = meta["config_toml"].as_str().expect("config");
            assert!(toml.contains("width = 4"), "{toml}");
            let toml = toml.replace("width = 4", "width = 65536");
            meta["config_toml"] = serde_json::Value::String(toml);
            let mut parts = s.parts.clone();
            parts[0] = serde_json::to_vec(&meta).expect("meta");
            assemble(&parts)
        },
    ),
];

#[test]
fn checkpoint_reader_survives_mutations() {
    campaign(
        "checkpoint_reader_survives_mutations",
        5000,
        checkpoint_state,
        CHECKPOINT_REGRESSIONS.len(),
        |s, dir, id| {
            let mut m = Mutator::new("checkpoint", id.unwrap_or_default());
            let bytes = match (id, m.rng.below(10)) {
                (Err(k), _) => (CHECKPOINT_REGRESSIONS[k].1)(s),
                // The container: magic, version, lengths, CRC (fixed up most of the time).
                (_, 0..=2) => {
                    let mut b = m.bytes(&s.bytes, &s.fields, &[]);
                    if m.rng.chance(0.8) {
                        fix_crc(&mut b);
                    }
                    b
                }
                // The metadata, as JSON text or through its embedded config.
                (_, 3..=6) => {
                    let mut parts = s.parts.clone();
                    let meta = String::from_utf8_lossy(&s.parts[0]).into_owned();
                    parts[0] = match m.rng.below(3) {
                        0 => mutate_embedded_config(&mut m, &s.parts[0]),
                        1 => m.json(&meta),
                        _ => m.text(&meta),
                    };
                    assemble(&parts)
                }
                // The model or optimiser records (burnpack).
                _ => {
                    let mut parts = s.parts.clone();
                    let k = 1 + m.rng.below(2);
                    parts[k] = m.bytes(&s.parts[k], &[], &[]);
                    assemble(&parts)
                }
            };
            let _ = clean(
                "Checkpoint::from_bytes",
                "x.ctck",
                Checkpoint::from_bytes(&bytes, Path::new("x.ctck")),
            );
            let f = dir.join("case.ctck");
            write(&f, &bytes);
            // What predict, evaluate, validate and export do: the checkpoint, its config, the
            // model; and what resume does: the optimiser state.
            let Some(t) = clean(
                "Trained::open",
                "case.ctck",
                ctseg::train::Trained::open(&f, CheckpointKind::Last),
            ) else {
                return;
            };
            let be = &s.backend;
            if clean("Trained::model", "case.ctck", t.model(be, &be.device)).is_some() {
                let ad = be.device.clone().autodiff();
                let state = ctseg::train::TrainState::fresh(&t.cfg, &ad, be.caps);
                let _ = clean(
                    "TrainState::load_bytes",
                    "case.ctck",
                    state.load_bytes(&t.cfg, (t.ck.model.clone(), t.ck.optimizer.clone()), &f),
                );
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Run configs

fn config_texts() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs"))
            .expect("configs")
            .flatten()
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read_to_string(e.path()).expect("config"),
                )
            })
            .collect();
    v.push((
        "tiny.toml".into(),
        std::fs::read_to_string(common::TINY).expect("tiny"),
    ));
    v.sort();
    v
}

#[test]
fn config_reader_survives_mutations() {
    campaign(
        "config_reader_survives_mutations",
        5000,
        |_| config_texts(),
        0,
        |texts, dir, id| {
            let seed = id.unwrap_or_default();
            let mut m = Mutator::new("config", seed);
            let (_, base) = m.rng.pick(texts).clone();
            let bytes = if m.rng.chance(0.8) {
                m.text(&base)
            } else {
                m.bytes(base.as_bytes(), &[], &[])
            };
            let f = dir.join("case.toml");
            write(&f, &bytes);
            let Some(cfg) = clean(
                "RunConfig::load",
                "case.toml",
                ctseg::config::RunConfig::load(Some(&f)),
            ) else {
                return;
            };
            if clean(
                "RunConfig::validate",
                "case.toml",
                cfg.validate("case.toml"),
            )
            .is_some()
            {
                // As `config.resolved.toml`: written, and read back to the same text.
                let text = cfg.to_toml().expect("a valid config serialises");
                let back = ctseg::config::RunConfig::from_toml(&text, &f).expect("and reads back");
                assert_eq!(
                    back.to_toml().ok(),
                    Some(text),
                    "the resolved config reads back as itself"
                );
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// CSV case lists

struct CsvState {
    csv: String,
    lits: Vec<String>,
}

#[test]
fn csv_reader_survives_mutations() {
    campaign(
        "csv_reader_survives_mutations",
        5000,
        |_| {
            CsvState {
            csv: "image,label\na.nii.gz,seg-a.nii.gz\n\"b.nii\",seg-b.nii.gz\n# a comment\n\nseries,seg-c.nii.gz\n./a2.nii.gz,seg-a.nii.gz\n".into(),
            lits: [
                "volume-0.nii.gz",
                "segmentation-0.nii.gz",
                "volume-1.nii",
                "segmentation-1.nii.gz",
                "batch/volume-2.nii.gz",
                "batch/segmentation-2.nii",
            ]
            .map(String::from)
            .to_vec(),
        }
        },
        0,
        |s, dir, id| {
            let seed = id.unwrap_or_default();
            let mut m = Mutator::new("csv", seed);
            for f in [
                "a.nii.gz",
                "a2.nii.gz",
                "b.nii",
                "seg-a.nii.gz",
                "seg-b.nii.gz",
                "seg-c.nii.gz",
            ] {
                write(&dir.join(f), b"");
            }
            std::fs::create_dir_all(dir.join("series")).expect("mkdir");
            if m.rng.chance(0.8) {
                let f = dir.join("cases.csv");
                write(&f, &m.text(&s.csv));
                let _ = clean("find_pairs", "cases.csv", prepare::find_pairs(&f));
            } else {
                // A LiTS folder whose file names are mutated.
                let lits = dir.join("lits");
                std::fs::create_dir_all(lits.join("batch")).expect("mkdir");
                let names = String::from_utf8_lossy(&m.text(&s.lits.join("\n"))).into_owned();
                for name in names.lines().filter(|n| !n.is_empty() && !n.contains("..")) {
                    let _ = std::fs::write(lits.join(name.trim_start_matches('/')), b"");
                }
                let _ = clean("find_pairs", "lits", prepare::find_pairs(&lits));
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// The report's readers: metrics.jsonl and summary.json

fn run_files(dir: &Path) -> (String, String) {
    let run = tiny_run(dir);
    (
        std::fs::read_to_string(run.join(rundir::METRICS)).expect("metrics"),
        std::fs::read_to_string(run.join(rundir::SUMMARY)).expect("summary"),
    )
}

#[test]
fn metrics_reader_survives_mutations() {
    campaign(
        "metrics_reader_survives_mutations",
        4000,
        run_files,
        0,
        |(metrics, _), dir, id| {
            let seed = id.unwrap_or_default();
            let mut m = Mutator::new("metrics", seed);
            let f = dir.join(rundir::METRICS);
            let bytes = if m.rng.chance(0.5) {
                m.json_lines(metrics)
            } else {
                m.text(metrics)
            };
            write(&f, &bytes);
            let _ = clean("metrics::read", "metrics.jsonl", rundir::metrics::read(&f));
            let _ = clean(
                "metrics::truncate_after",
                "metrics.jsonl",
                rundir::metrics::truncate_after(&f, 1),
            );
        },
    );
}

#[test]
fn summary_reader_survives_mutations() {
    campaign(
        "summary_reader_survives_mutations",
        5000,
        run_files,
        0,
        |(_, summary), dir, id| {
            let seed = id.unwrap_or_default();
            let mut m = Mutator::new("summary", seed);
            let f = dir.join(rundir::SUMMARY);
            let bytes = if m.rng.chance(0.5) {
                m.json(summary)
            } else {
                m.text(summary)
            };
            write(&f, &bytes);
            let _ = clean("Summary::read", "summary.json", Summary::read(&f));
        },
    );
}
