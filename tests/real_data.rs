//! Real CT volumes: the NIfTI reader against facts read with nibabel (tests/fixtures/nifti/
//! NOTICE.md), reorientation, `prepare` into a dataset with folds, and every kind of bad input
//! (each must name the file and leave no output behind).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use ctseg::data::Dataset;
use ctseg::data::nifti;
use ctseg::data::prepare::{self, PrepareOptions, Resize};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/nifti")
        .join(name)
}

fn ct() -> PathBuf {
    fixture("example_ct_sm.nii.gz")
}

fn liver() -> PathBuf {
    fixture("liver.nii.gz")
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).expect("open"))
        .read_to_end(&mut out)
        .expect("gunzip");
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    w.write_all(bytes).expect("gzip");
    w.finish().expect("gzip")
}

fn opts(input: &Path, out: &Path, size: usize, folds: usize) -> PrepareOptions {
    PrepareOptions {
        input: input.to_path_buf(),
        out: out.to_path_buf(),
        size,
        folds,
        margin: 0,
        resize: Resize::Nearest,
        per_shard: 16,
        seed: 1,
        quiet: true,
    }
}

#[test]
fn reader_matches_nibabel_facts() {
    // Facts from nibabel 5.4 (tests/fixtures/nifti/NOTICE.md).
    let v = nifti::read(&ct()).expect("read CT");
    assert_eq!(v.dims, [122, 101, 30]);
    assert_eq!(v.spacing, [3.0, 3.0, 3.0]);
    assert_eq!(v.datatype, 4, "int16");
    let want = [
        [3.0, 0.0, 0.0, -177.956_329],
        [0.0, 3.0, 0.0, 11.319],
        [0.0, 0.0, 3.0, 94.301_758],
    ];
    for (r, (got, want)) in v.affine.iter().zip(&want).enumerate() {
        for (c, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-4, "affine {r},{c}: {g} vs {w}");
        }
    }
    let (lo, hi) = v
        .data
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    assert_eq!((lo, hi), (-1100.0, 1207.0));
    let sum: i64 = v.data.iter().map(|&x| x as i64).sum();
    assert_eq!(sum, -130_894_872);
    let at = |i: usize, j: usize, k: usize| v.data[i + 122 * (j + 101 * k)];
    assert_eq!(at(10, 20, 5), -985.0);
    assert_eq!(at(0, 0, 0), -1024.0);
    assert_eq!(at(121, 100, 29), -997.0);

    let m = nifti::read(&liver()).expect("read mask");
    assert_eq!(m.datatype, 2, "uint8");
    assert_eq!(m.dims, v.dims);
    prepare::check_same_grid(&v, &m).expect("same grid");
    let labels = prepare::label_values(&m).expect("0/1 labels");
    assert_eq!(labels.iter().map(|&l| l as u64).sum::<u64>(), 39_350);
    assert_eq!(
        nifti::orientation(&v.path, &v.affine).expect("orientation"),
        [(0, 1), (1, 1), (2, 1)],
        "R, A, S"
    );
}

#[test]
fn canonical_layout_puts_the_liver_on_the_image_left_and_round_trips() {
    let m = nifti::read(&liver()).expect("read");
    let c = nifti::to_canonical(&m).expect("canonical");
    assert_eq!((c.cols, c.rows, c.slices), (122, 101, 30));
    // Centroid i = 80.65 of 122 (patient's right, nibabel); columns run towards the left, so
    // the liver lands at column 121 − 80.65 = 40.35: the image's left, as radiologists view it.
    let (mut sum, mut n) = (0.0, 0.0);
    for (k, &v) in c.data.iter().enumerate() {
        if v > 0.0 {
            sum += (k % c.cols) as f64;
            n += 1.0;
        }
    }
    assert!((sum / n - 40.35).abs() < 0.01, "liver column {}", sum / n);
    let u8s: Vec<u8> = c.data.iter().map(|&v| v as u8).collect();
    let back = c.to_source_order(&u8s, m.dims);
    let orig: Vec<u8> = m.data.iter().map(|&v| v as u8).collect();
    assert_eq!(back, orig);
}

#[test]
fn prepare_from_csv_and_lits_folder_with_folds() {
    let d = tempfile::tempdir().expect("tmp");
    // A CSV like the study's trainingdata.csv: a header, then image,label rows. The same real
    // pair twice makes two volumes (two folds).
    let csv = d.path().join("trainingdata.csv");
    std::fs::write(
        &csv,
        format!(
            "image,label\n{},{}\n{},{}\n",
            ct().display(),
            liver().display(),
            ct().display(),
            liver().display()
        ),
    )
    .expect("csv");
    let out = d.path().join("ds");
    let (m, s) = prepare::prepare(&opts(&csv, &out, 64, 2)).expect("prepare");
    assert_eq!(s.volumes, 2);
    assert_eq!(m.slices, 60, "liver on all 30 slices of each volume");
    let folds: Vec<_> = m.volumes.iter().map(|v| v.fold).collect();
    assert!(
        folds.contains(&Some(0)) && folds.contains(&Some(1)),
        "{folds:?}"
    );
    let ds = Dataset::open(&out).expect("open");
    assert_eq!(ds.size, 64);
    assert_eq!(ds.len(), 60);
    // HU survive as int16 (nearest resize picks voxels): within the CT's range.
    assert!(ds.images.iter().all(|&h| (-1100..=1207).contains(&h)));
    // Liver pixels after nearest resizing 122×101 → 64×64: about 39,350 · 64² / (122·101).
    let liver_px = m.volumes[0].label_counts[1] as f64;
    let expect = 39_350.0 * 4096.0 / (122.0 * 101.0);
    assert!(
        (liver_px / expect - 1.0).abs() < 0.05,
        "{liver_px} vs {expect}"
    );
    let (tr, va) = ds.split_by_fold(1).expect("fold split");
    assert_eq!((tr.len(), va.len()), (30, 30));
    assert!(ds.split_by_fold(2).is_err());

    // The LiTS layout: volume-N / segmentation-N, nested one level.
    let lits = d.path().join("lits");
    std::fs::create_dir_all(lits.join("batch1")).expect("mkdir");
    std::fs::copy(ct(), lits.join("batch1/volume-7.nii.gz")).expect("copy");
    std::fs::copy(liver(), lits.join("batch1/segmentation-7.nii.gz")).expect("copy");
    let pairs = prepare::find_pairs(&lits).expect("pairs");
    assert_eq!(pairs.len(), 1);
    let out2 = d.path().join("ds2");
    let mut o = opts(&lits, &out2, 32, 1);
    o.resize = Resize::Area;
    o.margin = 3;
    let (m2, _) = prepare::prepare(&o).expect("prepare lits");
    assert_eq!(m2.slices, 30);
    assert_eq!(m2.volumes[0].name, "volume-7.nii.gz");
}

#[test]
fn prepare_and_train_on_a_fold_from_the_command_line() {
    let d = tempfile::tempdir().expect("tmp");
    let lits = d.path().join("lits");
    std::fs::create_dir_all(&lits).expect("mkdir");
    for n in 0..2 {
        std::fs::copy(ct(), lits.join(format!("volume-{n}.nii.gz"))).expect("copy");
        std::fs::copy(liver(), lits.join(format!("segmentation-{n}.nii.gz"))).expect("copy");
    }
    let bin = env!("CARGO_BIN_EXE_ctseg");
    let ds = d.path().join("ds");
    let o = Command::new(bin)
        .args(["prepare", "--input"])
        .arg(&lits)
        .arg("--out")
        .arg(&ds)
        .args(["--size", "32", "--folds", "2"])
        .output()
        .expect("run");
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("prepared 2 volumes, 60 slices of 32x32"),
        "{text}"
    );
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny.toml");
    let run = d.path().join("run");
    let o = Command::new(bin)
        .args(["train", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(&ds)
        .args([
            "--fold",
            "0",
            "--size",
            "32",
            "--max-steps",
            "2",
            "--quiet",
            "--out",
        ])
        .arg(&run)
        .output()
        .expect("run");
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).expect("summary"))
            .expect("json");
    assert_eq!(summary["train_slices"], 30, "{summary}");
    assert_eq!(summary["val_slices"], 30, "{summary}");
}

/// Runs `prepare` on one (image, label) pair and returns its error text; asserts that nothing
/// was written.
fn prepare_error(image: &Path, label: &Path) -> String {
    let d = tempfile::tempdir().expect("tmp");
    let csv = d.path().join("pairs.csv");
    std::fs::write(&csv, format!("{},{}\n", image.display(), label.display())).expect("csv");
    let out = d.path().join("out");
    let e = prepare::prepare(&opts(&csv, &out, 32, 1)).expect_err("must fail");
    assert!(!out.exists(), "half-written output left behind");
    let leftovers: Vec<_> = std::fs::read_dir(d.path())
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "pairs.csv")
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    e.to_string()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

fn set_i16(h: &mut [u8], off: usize, v: i16) {
    h[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn bad_volumes_get_errors_naming_the_file_and_the_field() {
    let d = tempfile::tempdir().expect("tmp");
    let raw = gunzip(&ct());
    let gz = std::fs::read(ct()).expect("read");
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            write(d.path(), "cut.nii.gz", &gz[..gz.len() / 2]),
            "gzip stream ends early",
        ),
        (
            write(d.path(), "plain.nii.gz", &raw),
            "not a valid gzip stream",
        ),
        (
            {
                let mut b = raw.clone();
                b[344..348].copy_from_slice(b"xyz\0");
                write(d.path(), "magic.nii", &b)
            },
            "header field magic",
        ),
        (
            {
                let mut b = raw.clone();
                set_i16(&mut b, 70, 32); // complex64
                write(d.path(), "complex.nii", &b)
            },
            "header field datatype = 32 (complex64)",
        ),
        (
            {
                let mut b = raw.clone();
                set_i16(&mut b, 40, 4);
                set_i16(&mut b, 48, 2); // dim[4] = 2 time points
                write(d.path(), "fourd.nii", &b)
            },
            "4-D volume",
        ),
        (
            {
                let mut b = raw.clone();
                b[0..4].copy_from_slice(&100i32.to_le_bytes());
                write(d.path(), "sizeof.nii", &b)
            },
            "sizeof_hdr = 100",
        ),
    ];
    for (path, want) in cases {
        let e = prepare_error(&path, &liver());
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(
            e.contains(&name),
            "{name}: error does not name the file: {e}"
        );
        assert!(e.contains(want), "{name}: expected {want:?} in: {e}");
    }
}

#[test]
fn bad_pairs_and_labels_are_refused() {
    let d = tempfile::tempdir().expect("tmp");
    let m = nifti::read(&liver()).expect("read");
    let labels: Vec<u8> = m.data.iter().map(|&v| v as u8).collect();

    // Another grid: cropped dims.
    let small = d.path().join("small.nii.gz");
    nifti::write_u8(&small, [10, 10, 10], &m.affine, &[0u8; 1000]).expect("write");
    let e = prepare_error(&ct(), &small);
    assert!(
        e.contains("small.nii.gz") && e.contains("dims [10, 10, 10] differ"),
        "{e}"
    );
    assert!(e.contains("example_ct_sm.nii.gz"), "names both files: {e}");

    // Same dims, shifted by 5 mm.
    let mut shifted = m.affine;
    shifted[0][3] += 5.0;
    let moved = d.path().join("moved.nii.gz");
    nifti::write_u8(&moved, m.dims, &shifted, &labels).expect("write");
    let e = prepare_error(&ct(), &moved);
    assert!(
        e.contains("moved.nii.gz") && e.contains("affine[0][3]"),
        "{e}"
    );

    // A label value outside {0, 1, 2}.
    let mut bad = labels.clone();
    bad[5 + 122 * (6 + 101 * 7)] = 3;
    let three = d.path().join("three.nii.gz");
    nifti::write_u8(&three, m.dims, &m.affine, &bad).expect("write");
    let e = prepare_error(&ct(), &three);
    assert!(
        e.contains("three.nii.gz") && e.contains("voxel (5, 6, 7) has label 3"),
        "{e}"
    );

    // A NaN voxel in a float32 image.
    let raw = gunzip(&ct());
    let off = f32::from_le_bytes([raw[108], raw[109], raw[110], raw[111]]) as usize;
    let mut f = raw[..off].to_vec();
    set_i16(&mut f, 70, 16); // float32
    set_i16(&mut f, 72, 32);
    let n = 122 * 101 * 30;
    for k in 0..n {
        let hu = i16::from_le_bytes([raw[off + 2 * k], raw[off + 2 * k + 1]]) as f32;
        let v = if k == 1 + 122 * (2 + 101 * 3) {
            f32::NAN
        } else {
            hu
        };
        f.extend_from_slice(&v.to_le_bytes());
    }
    let nan = write(d.path(), "nan.nii.gz", &gzip(&f));
    let e = prepare_error(&nan, &liver());
    assert!(
        e.contains("nan.nii.gz") && e.contains("voxel (1, 2, 3) is NaN"),
        "{e}"
    );
    // The same file without the NaN reads back as the int16 original.
    let mut f2 = f.clone();
    let k = 1 + 122 * (2 + 101 * 3);
    f2[off + 4 * k..off + 4 * k + 4].copy_from_slice(&(-1000f32).to_le_bytes());
    let ok = write(d.path(), "float.nii.gz", &gzip(&f2));
    let v = nifti::read(&ok).expect("float32 volume");
    assert_eq!(v.datatype, 16);
    assert_eq!(v.data[0], -1024.0);

    // A DICOM folder is not read yet, and says so.
    let dicom = d.path().join("series");
    std::fs::create_dir(&dicom).expect("mkdir");
    let e = prepare_error(&dicom, &liver());
    assert!(e.contains("series") && e.contains("DICOM"), "{e}");
}

#[test]
fn written_masks_open_with_the_input_grid() {
    let d = tempfile::tempdir().expect("tmp");
    let m = nifti::read(&liver()).expect("read");
    let labels: Vec<u8> = m.data.iter().map(|&v| v as u8).collect();
    let out = d.path().join("mask.nii.gz");
    nifti::write_u8(&out, m.dims, &m.affine, &labels).expect("write");
    let back = nifti::read(&out).expect("read back");
    assert_eq!(back.dims, m.dims);
    assert_eq!(back.affine, m.affine.map(|r| r.map(|v| v as f32 as f64)));
    assert_eq!(back.data, m.data);
    // nibabel, when present, sees the same shape, affine and voxels.
    let script = format!(
        "import nibabel as nib, numpy as np\n\
         a = nib.load({out:?}); b = nib.load({src:?})\n\
         assert a.shape == b.shape, (a.shape, b.shape)\n\
         assert np.allclose(a.affine, b.affine, atol=1e-4), (a.affine, b.affine)\n\
         assert (np.asarray(a.dataobj) == np.asarray(b.dataobj)).all()\n\
         print('nibabel ok')",
        out = out.display().to_string(),
        src = liver().display().to_string()
    );
    match Command::new("python3").args(["-c", &script]).output() {
        Ok(o) if o.status.success() => {
            assert!(String::from_utf8_lossy(&o.stdout).contains("nibabel ok"));
        }
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            if err.contains("No module named 'nibabel'") {
                eprintln!("skipped the nibabel check: nibabel is not installed");
            } else {
                panic!("nibabel disagrees: {err}");
            }
        }
        Err(e) => eprintln!("skipped the nibabel check: python3 not found ({e})"),
    }
}
