//! DICOM series: the reader against facts read with pydicom (tests/fixtures/dicom/NOTICE.md),
//! JPEG 2000 against uncompressed, slice ordering and spacing, mixed series and missing slices
//! refused with the file named, and a DICOM image through `prepare`.

mod common;

use std::path::{Path, PathBuf};

use ctseg::data::dicom;
use ctseg::data::nifti;
use ctseg::data::prepare::{self, PrepareOptions, Resize};
use dicom_core::VR;
use dicom_dictionary_std::tags;

fn fixture(name: &str) -> PathBuf {
    common::fixture(&format!("dicom/{name}"))
}

/// A folder holding copies of `files` (source, name in the folder).
fn series(root: &Path, dir: &str, files: &[(PathBuf, &str)]) -> PathBuf {
    let d = root.join(dir);
    std::fs::create_dir_all(&d).expect("mkdir");
    for (src, name) in files {
        std::fs::copy(src, d.join(name)).expect("copy");
    }
    d
}

/// The uncompressed 512² slice with its ImagePositionPatient z set to `z`.
fn slice_at(root: &Path, name: &str, z: f64) -> PathBuf {
    let mut obj = dicom_object::open_file(fixture("ts_slice_uncompressed.dcm")).expect("open");
    obj.put_str(
        tags::IMAGE_POSITION_PATIENT,
        VR::DS,
        format!("-249.51171875\\-437.51171875\\{z}"),
    );
    let p = root.join(name);
    obj.write_to_file(&p).expect("write");
    p
}

#[test]
fn ct_small_matches_pydicom() {
    let d = tempfile::tempdir().expect("tmp");
    let dir = series(d.path(), "s", &[(fixture("CT_small.dcm"), "1.dcm")]);
    let v = dicom::read_series(&dir).expect("read");
    assert_eq!(v.dims, [128, 128, 1]);
    let (lo, hi) = v
        .data
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    // pydicom: pixel_array · RescaleSlope + RescaleIntercept.
    assert_eq!((lo, hi), (-896.0, 1167.0));
    assert_eq!(v.data.iter().map(|&x| x as i64).sum::<i64>(), -1_950_906);
    assert_eq!(v.data[50 + 128 * 100], 16.0, "HU[row 100, col 50]");
    // LPS → RAS: x and y negated; one slice takes SliceThickness (5 mm) as its spacing.
    let s = 0.661468;
    let want = [
        [-s, 0.0, 0.0, 158.135803],
        [0.0, -s, 0.0, 179.035797],
        [0.0, 0.0, 5.0, -75.699997],
    ];
    for (got, want) in v.affine.iter().zip(&want) {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{:?} vs {want:?}", v.affine);
        }
    }
}

#[test]
fn jpeg2000_decodes_to_the_uncompressed_values() {
    let d = tempfile::tempdir().expect("tmp");
    let j2k = dicom::read_series(&series(
        d.path(),
        "j",
        &[(fixture("ts_slice_j2k.dcm"), "x.dcm")],
    ))
    .expect("j2k");
    let raw = dicom::read_series(&series(
        d.path(),
        "u",
        &[(fixture("ts_slice_uncompressed.dcm"), "x.dcm")],
    ))
    .expect("uncompressed");
    assert_eq!(j2k.dims, [512, 512, 1]);
    assert!(
        j2k.data == raw.data,
        "JPEG 2000 lossless must decode bit-exactly"
    );
    assert_eq!(
        raw.data.iter().map(|&x| x as i64).sum::<i64>(),
        -163_079_110
    );
    let (lo, hi) = raw
        .data
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    assert_eq!((lo, hi), (-1024.0, 1436.0));
}

#[test]
fn slices_are_ordered_by_position_and_gaps_refused() {
    let d = tempfile::tempdir().expect("tmp");
    let dir = d.path().join("three");
    std::fs::create_dir_all(&dir).expect("mkdir");
    // File names in the opposite order of the positions.
    slice_at(&dir, "a.dcm", -764.5);
    slice_at(&dir, "b.dcm", -765.5);
    slice_at(&dir, "c.dcm", -766.5);
    let v = dicom::read_series(&dir).expect("read");
    assert_eq!(v.dims, [512, 512, 3]);
    assert_eq!(v.spacing, [0.9765625, 0.9765625, 1.0]);
    // The first slice is the most inferior (z = -766.5), and k runs towards superior.
    assert_eq!(v.affine[2], [0.0, 0.0, 1.0, -766.5]);
    assert_eq!(
        nifti::orientation(&v.path, &v.affine).expect("orientation"),
        [(0, -1), (1, -1), (2, 1)],
        "L, P, S (DICOM's LPS)"
    );

    let gap = d.path().join("gap");
    std::fs::create_dir_all(&gap).expect("mkdir");
    slice_at(&gap, "1.dcm", -766.5);
    slice_at(&gap, "2.dcm", -765.5);
    slice_at(&gap, "3.dcm", -764.5);
    slice_at(&gap, "4.dcm", -761.5);
    let e = dicom::read_series(&gap).expect_err("gap").to_string();
    assert!(
        e.contains("4.dcm") && e.contains("2 slice(s) missing"),
        "{e}"
    );

    let dup = d.path().join("dup");
    std::fs::create_dir_all(&dup).expect("mkdir");
    slice_at(&dup, "1.dcm", -766.5);
    slice_at(&dup, "2.dcm", -766.5);
    let e = dicom::read_series(&dup).expect_err("duplicate").to_string();
    assert!(e.contains("duplicated slice"), "{e}");
}

#[test]
fn mixed_series_and_non_dicom_files_are_named() {
    let d = tempfile::tempdir().expect("tmp");
    let dir = series(
        d.path(),
        "mixed",
        &[
            (fixture("CT_small.dcm"), "a.dcm"),
            (fixture("ts_slice_uncompressed.dcm"), "b.dcm"),
        ],
    );
    let e = dicom::read_series(&dir).expect_err("mixed").to_string();
    assert!(e.contains("mixed series") && e.contains("a.dcm"), "{e}");
    let junk = d.path().join("junk");
    std::fs::create_dir_all(&junk).expect("mkdir");
    std::fs::write(junk.join("notes.txt"), "not an image").expect("write");
    let e = dicom::read_series(&junk).expect_err("junk").to_string();
    assert!(
        e.contains("notes.txt") && e.contains("not a readable DICOM file"),
        "{e}"
    );
    let empty = d.path().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    assert!(dicom::read_series(&empty).is_err());
}

#[test]
fn a_dicom_series_goes_through_prepare() {
    let d = tempfile::tempdir().expect("tmp");
    let dir = d.path().join("ct");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for (k, z) in [-766.5, -765.5, -764.5, -763.5].iter().enumerate() {
        slice_at(&dir, &format!("{k}.dcm"), *z);
    }
    let v = dicom::read_series(&dir).expect("read");
    // A label on the series' grid: a liver disc on the two middle slices.
    let [nx, ny, nz] = v.dims;
    let mut lab = vec![0u8; nx * ny * nz];
    for k in 1..3 {
        for j in 200..260 {
            for i in 300..380 {
                lab[i + nx * (j + ny * k)] = 1;
            }
        }
    }
    let label = d.path().join("seg.nii.gz");
    nifti::write_u8(&label, v.dims, &v.affine, &lab).expect("label");
    let csv = d.path().join("pairs.csv");
    std::fs::write(&csv, format!("{},{}\n", dir.display(), label.display())).expect("csv");
    let out = d.path().join("ds");
    let opts = PrepareOptions {
        input: csv,
        out: out.clone(),
        size: 64,
        folds: 1,
        margin: 0,
        resize: Resize::Nearest,
        per_shard: 8,
        seed: 1,
        quiet: true,
    };
    let (m, _) = prepare::prepare(&opts).expect("prepare");
    assert_eq!(m.slices, 2, "the liver's z-range");
    // Nearest 512 → 64 samples source pixel 8t + 4: rows 200..260 give t = 25..=31 (7), columns
    // 300..380 give t = 37..=46 (10): 70 liver pixels per slice.
    assert_eq!(m.volumes[0].label_counts[1], 140);
    let ds = ctseg::data::Dataset::open(&out).expect("open");
    assert!(ds.images.iter().all(|&h| (-1024..=1436).contains(&h)));
}

/// The uncompressed slice with ImagePositionPatient `(x, y, z)` and, if given,
/// ImageOrientationPatient `iop`, written as `root/name`.
fn slice_with(root: &Path, name: &str, pos: [f64; 3], iop: Option<&str>) -> PathBuf {
    let mut obj = dicom_object::open_file(fixture("ts_slice_uncompressed.dcm")).expect("open");
    obj.put_str(
        tags::IMAGE_POSITION_PATIENT,
        VR::DS,
        format!("{}\\{}\\{}", pos[0], pos[1], pos[2]),
    );
    if let Some(iop) = iop {
        obj.put_str(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, iop);
    }
    let p = root.join(name);
    obj.write_to_file(&p).expect("write");
    p
}

#[test]
fn a_gantry_tilted_series_is_refused_with_how_to_correct_it() {
    // A 10° tilt: each slice 1 mm up moves its origin tan(10°) = 0.176 mm along y, while
    // ImageOrientationPatient stays axial. Read as untilted, the volume is sheared.
    let d = tempfile::tempdir().expect("tmp");
    let dir = d.path().join("tilted");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let shift = 10f64.to_radians().tan();
    for k in 0..3 {
        let z = -766.5 + k as f64;
        slice_with(
            &dir,
            &format!("{k}.dcm"),
            [-249.51171875, -437.51171875 + shift * k as f64, z],
            None,
        );
    }
    let e = dicom::read_series(&dir).expect_err("tilted").to_string();
    for want in ["1.dcm", "gantry tilt of 10.00 degrees", "dcm2niix"] {
        assert!(e.contains(want), "{want:?} missing: {e}");
    }
    // Positions rounded to 0.001 mm are not a tilt (0.001 mm is a thousandth of a pixel).
    let dir = d.path().join("rounded");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for k in 0..3 {
        let x = -249.51171875 + [0.0, 0.001, -0.001][k];
        slice_with(
            &dir,
            &format!("{k}.dcm"),
            [x, -437.51171875, -766.5 + k as f64],
            None,
        );
    }
    assert!(dicom::read_series(&dir).is_ok());
}

#[test]
fn oblique_slices_are_refused_with_how_to_resample() {
    // ImageOrientationPatient turned 5° about z: the rows run 5° off the x axis.
    let d = tempfile::tempdir().expect("tmp");
    let dir = d.path().join("oblique");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (s, c) = 5f64.to_radians().sin_cos();
    let iop = format!("{c:.8}\\{s:.8}\\0\\{:.8}\\{c:.8}\\0", -s);
    slice_with(&dir, "0.dcm", [0.0, 0.0, 0.0], Some(&iop));
    slice_with(&dir, "1.dcm", [0.0, 0.0, 1.0], Some(&iop));
    let e = dicom::read_series(&dir).expect_err("oblique").to_string();
    for want in ["oblique", "5.000°", "dcm2niix", "ResampleImageFilter"] {
        assert!(e.contains(want), "{want:?} missing: {e}");
    }
}

#[test]
fn an_empty_image_is_refused_naming_the_file() {
    // Rows = Columns = 0 reached the resizers, whose `n − 1` underflowed.
    let d = tempfile::tempdir().expect("tmp");
    let dir = d.path().join("empty");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut obj = dicom_object::open_file(fixture("CT_small.dcm")).expect("open");
    obj.put(dicom_object::mem::InMemElement::new(
        tags::ROWS,
        VR::US,
        dicom_core::PrimitiveValue::from(0u16),
    ));
    obj.put(dicom_object::mem::InMemElement::new(
        tags::COLUMNS,
        VR::US,
        dicom_core::PrimitiveValue::from(0u16),
    ));
    obj.write_to_file(dir.join("zero.dcm")).expect("write");
    let e = dicom::read_series(&dir).expect_err("empty").to_string();
    assert!(e.contains("zero.dcm") && e.contains("empty image"), "{e}");
}
