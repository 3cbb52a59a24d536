//! Real CT volumes: the NIfTI reader against facts read with nibabel (tests/fixtures/nifti/
//! NOTICE.md), reorientation, `prepare` into a dataset with folds, and every kind of bad input
//! (each must name the file and leave no output behind).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ctseg::data::Dataset;
use ctseg::data::nifti;
use ctseg::data::prepare::{self, PrepareOptions, Resize};

fn fixture(name: &str) -> PathBuf {
    common::fixture(&format!("nifti/{name}"))
}

fn ct() -> PathBuf {
    fixture("example_ct_sm.nii.gz")
}

fn liver() -> PathBuf {
    fixture("liver.nii.gz")
}

/// The gunzipped contents of the file at `path`.
fn gunzip_file(path: &Path) -> Vec<u8> {
    common::gunzip(&std::fs::read(path).expect("read"))
}

/// A LiTS-layout folder `root/lits` with `n` copies of the real (CT, liver) pair.
fn lits_folder(root: &Path, n: usize) -> PathBuf {
    let lits = root.join("lits");
    std::fs::create_dir_all(&lits).expect("mkdir");
    for k in 0..n {
        std::fs::copy(ct(), lits.join(format!("volume-{k}.nii.gz"))).expect("copy");
        std::fs::copy(liver(), lits.join(format!("segmentation-{k}.nii.gz"))).expect("copy");
    }
    lits
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
    // A CSV like the study's trainingdata.csv: a header, then image,label rows. Two copies of
    // the real pair make two volumes (two folds); the same file twice would be refused.
    let copy = d.path().join("ct-copy.nii.gz");
    std::fs::copy(ct(), &copy).expect("copy");
    let csv = d.path().join("trainingdata.csv");
    std::fs::write(
        &csv,
        format!(
            "image,label\n{},{}\n{},{}\n",
            ct().display(),
            liver().display(),
            copy.display(),
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
    let lits = lits_folder(d.path(), 2);
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
    let raw = gunzip_file(&ct());
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
    let raw = gunzip_file(&ct());
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
    let nan = write(d.path(), "nan.nii.gz", &common::gzip(&f));
    let e = prepare_error(&nan, &liver());
    assert!(
        e.contains("nan.nii.gz") && e.contains("voxel (1, 2, 3) is NaN"),
        "{e}"
    );
    // The same file without the NaN reads back as the int16 original.
    let mut f2 = f.clone();
    let k = 1 + 122 * (2 + 101 * 3);
    f2[off + 4 * k..off + 4 * k + 4].copy_from_slice(&(-1000f32).to_le_bytes());
    let ok = write(d.path(), "float.nii.gz", &common::gzip(&f2));
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
    if let Some(out) = common::python_reference(
        "nibabel check",
        &["nibabel", "numpy"],
        &["-c", &script],
        &[],
    ) {
        assert!(out.contains("nibabel ok"), "{out}");
    }
}

/// A model as the README's real-CT section makes one: two copies of the real (CT, liver) pair
/// prepared at 32², then 30 training steps. Trained once for the tests below, in cargo's
/// temporary folder for integration tests (replaced on every run).
struct LitsModel {
    lits: PathBuf,
    run: PathBuf,
    root: PathBuf,
}

fn lits_model() -> &'static LitsModel {
    static MODEL: std::sync::OnceLock<LitsModel> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("real_data-lits-model");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("mkdir");
        let lits = lits_folder(&root, 2);
        let (_, run) = prepare_and_train(&root, &lits, &[], 30);
        LitsModel { lits, run, root }
    })
}

/// `ctseg prepare` of `lits` at 32² (with `options`) into `dir/ds`, then the tiny config
/// trained on it for `steps` steps into `dir/run`: the dataset and the run.
fn prepare_and_train(
    dir: &Path,
    lits: &Path,
    options: &[&str],
    steps: usize,
) -> (PathBuf, PathBuf) {
    let (ds, run) = (dir.join("ds"), dir.join("run"));
    let mut prepare = vec![
        "prepare",
        "--input",
        common::s(lits),
        "--out",
        common::s(&ds),
    ];
    prepare.extend(["--size", "32", "--quiet"]);
    prepare.extend(options);
    common::ok(common::ctseg(&prepare));
    let steps = steps.to_string();
    common::ok(common::ctseg(&[
        "train",
        "--config",
        common::TINY,
        "--data",
        common::s(&ds),
        "--size",
        "32",
        "--max-steps",
        &steps,
        "--quiet",
        "--out",
        common::s(&run),
    ]));
    (ds, run)
}

#[test]
fn predict_writes_a_label_mask_on_the_inputs_grid() {
    let model = lits_model();
    let d = tempfile::tempdir().expect("tmp");
    let mask = d.path().join("mask.nii.gz");
    let text = common::ok(common::ctseg(&[
        "predict",
        "--checkpoint",
        common::s(&model.run),
        "--input",
        common::s(&ct()),
        "--output",
        common::s(&mask),
        "--largest-component",
    ]));
    assert!(text.contains("liver"), "{text}");
    let input = nifti::read(&ct()).expect("ct");
    let m = nifti::read(&mask).expect("mask");
    assert_eq!(m.dims, input.dims);
    for (a, b) in m.affine.iter().zip(&input.affine) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-4, "affine {a:?} vs {b:?}");
        }
    }
    assert!(m.data.iter().all(|&v| v == 0.0 || v == 1.0 || v == 2.0));
    // nibabel sees the input's shape and affine too.
    let script = format!(
        "import nibabel as nib, numpy as np\n\
         a = nib.load({m:?}); b = nib.load({c:?})\n\
         assert a.shape == b.shape, (a.shape, b.shape)\n\
         assert np.allclose(a.affine, b.affine, atol=1e-4), (a.affine, b.affine)\n\
         assert set(np.unique(np.asarray(a.dataobj))) <= {{0, 1, 2}}\n\
         print('nibabel ok')",
        m = mask.display().to_string(),
        c = ct().display().to_string()
    );
    if let Some(out) = common::python_reference(
        "nibabel check",
        &["nibabel", "numpy"],
        &["-c", &script],
        &[],
    ) {
        assert!(out.contains("nibabel ok"), "{out}");
    }
}

#[test]
fn predict_refuses_an_output_that_is_not_nifti_before_any_work() {
    let model = lits_model();
    let mask = model.root.join("mask.png");
    common::fails_with(
        common::ctseg(&[
            "predict",
            "--checkpoint",
            common::s(&model.run),
            "--input",
            common::s(&ct()),
            "--output",
            common::s(&mask),
        ]),
        2,
        &["mask.png"],
    );
    assert!(!mask.exists());
}

#[test]
fn evaluate_scores_every_case_and_its_dice_matches_a_recount_of_the_saved_mask() {
    let model = lits_model();
    let d = tempfile::tempdir().expect("tmp");
    let eval_dir = d.path().join("eval");
    let text = common::ok(common::ctseg(&[
        "evaluate",
        "--checkpoint",
        common::s(&model.run),
        "--input",
        common::s(&model.lits),
        "--out",
        common::s(&eval_dir),
        "--save-masks",
    ]));
    assert!(text.contains("2 cases: global Dice liver"), "{text}");
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(eval_dir.join("evaluation.json")).expect("json"),
    )
    .expect("parse");
    assert_eq!(v["cases"].as_array().map(Vec::len), Some(2));
    let dice = v["cases"][0]["dice_liver"].as_f64().expect("dice");
    assert!(v["global"]["dice_liver"].as_f64().is_some());
    let csv = std::fs::read_to_string(eval_dir.join("evaluation.csv")).expect("csv");
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(csv.starts_with("case,dice_liver,dice_tumour,"));
    // The same Dice recomputed independently from the saved mask, with nibabel and numpy when
    // present, else with this crate's reader and plain counting.
    let pred = eval_dir.join("volume-0-pred.nii.gz");
    let script = format!(
        "import nibabel as nib, numpy as np\n\
         p = np.asarray(nib.load({p:?}).dataobj) >= 1\n\
         t = np.asarray(nib.load({t:?}).dataobj) >= 1\n\
         print(repr(float(2.0 * (p & t).sum() / (p.sum() + t.sum()))))",
        p = pred.display().to_string(),
        t = liver().display().to_string()
    );
    let nib = common::python_reference(
        "Dice with nibabel",
        &["nibabel", "numpy"],
        &["-c", &script],
        &[],
    );
    let reference = match nib {
        Some(out) => out.trim().parse::<f64>().expect("float"),
        None => {
            eprintln!("nibabel not available: recomputing with the crate's reader");
            let p = nifti::read(&pred).expect("pred");
            let t = nifti::read(&liver()).expect("truth");
            let (mut tp, mut np, mut nt) = (0.0, 0.0, 0.0);
            for (a, b) in p.data.iter().zip(&t.data) {
                let (a, b) = (*a >= 1.0, *b >= 1.0);
                tp += (a && b) as u8 as f64;
                np += a as u8 as f64;
                nt += b as u8 as f64;
            }
            2.0 * tp / (np + nt)
        }
    };
    assert!(
        (dice - reference).abs() < 1e-9,
        "evaluate says {dice}, recomputed {reference}"
    );
}

/// `ctseg export` → PyTorch: the peer model loads the file with `strict=True` and, in eval
/// mode, reproduces ctseg's outputs on the same input (run when python3 with torch is present;
/// the file is parsed with the `safetensors` package if installed, else by hand).
#[test]
fn exported_weights_reproduce_ctseg_in_pytorch() {
    let d = tempfile::tempdir().expect("tmp");
    let bin = env!("CARGO_BIN_EXE_ctseg");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny.toml");
    let run = d.path().join("run");
    let o = Command::new(bin)
        .args(["train", "--config"])
        .arg(&config)
        .args(["--max-steps", "5", "--quiet", "--out"])
        .arg(&run)
        .output()
        .expect("train");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st = d.path().join("model.safetensors");
    let o = Command::new(bin)
        .args(["export", "--checkpoint"])
        .arg(&run)
        .arg("--out")
        .arg(&st)
        .output()
        .expect("export");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // 2 levels + bottleneck + 2 decoder levels = 10 blocks × 7 tensors + head weight and bias.
    assert!(text.starts_with("72 tensors"), "{text}");

    // ctseg's own eval-mode output on a closed-form input.
    let be = ctseg::backend::open(&ctseg::backend::DeviceRequest {
        kind: ctseg::backend::BackendKind::Cpu,
        threads: 1,
        adapter: None,
        gpu_conv: Default::default(),
        cooperative_matrices: true,
    })
    .expect("cpu");
    let trained =
        ctseg::train::Trained::open(&run, ctseg::rundir::CheckpointKind::Best).expect("checkpoint");
    let cfg = trained.cfg.clone();
    let model = trained.model(&be, &be.device).expect("model");
    let n = cfg.model.input_size;
    let x: Vec<f32> = (0..2 * n * n)
        .map(|j| (0.5 + 0.4 * (j as f64 * 0.05).sin()) as f32)
        .collect();
    let xt = burn::tensor::Tensor::<4>::from_data(
        burn::tensor::TensorData::new(x.clone(), [2, 1, n, n]),
        &be.device,
    );
    let ours = ctseg::tensor_util::to_f32(model.forward(xt, ctseg::model::Mode::Eval)).expect("y");
    let raw = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    std::fs::write(d.path().join("x.f32"), raw(&x)).expect("x");
    std::fs::write(d.path().join("y.f32"), raw(&ours)).expect("y");
    let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference");
    let script = format!(
        r#"
import json, struct, sys
import numpy as np, torch
sys.path.insert(0, {peer:?})
from livermask_torch import LivermaskUNet
path = {st:?}
try:
    from safetensors.torch import load_file
    sd = load_file(path)
except ImportError:
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    sd = {{}}
    for k, v in header.items():
        a, b = v["data_offsets"]
        dt = {{"F32": np.float32, "I64": np.int64}}[v["dtype"]]
        sd[k] = torch.from_numpy(np.frombuffer(raw[8 + n + a:8 + n + b], dtype=dt).copy().reshape(v["shape"]))
m = LivermaskUNet({w}, levels={depth}, classes={c}, dropout=0.0)
m.load_state_dict(sd, strict=True)
m.eval()
x = torch.from_numpy(np.fromfile({xf:?}, dtype=np.float32).reshape(2, 1, {n}, {n}))
y = np.fromfile({yf:?}, dtype=np.float32)
with torch.no_grad():
    p = m(x).numpy().ravel()
print(float(np.abs(p - y).max()))
"#,
        peer = peer.display().to_string(),
        st = st.display().to_string(),
        w = cfg.model.width,
        depth = cfg.model.depth,
        c = cfg.model.classes,
        xf = d.path().join("x.f32").display().to_string(),
        yf = d.path().join("y.f32").display().to_string(),
    );
    if let Some(out) = common::python_reference(
        "PyTorch loads the export",
        &["torch", "numpy"],
        &["-c", &script],
        &[],
    ) {
        let diff: f64 = out.trim().parse().expect("float");
        eprintln!("PyTorch vs ctseg, largest output difference: {diff:.2e}");
        // Probabilities in [0, 1]; f32 sums in another order.
        assert!(diff < 1e-5, "outputs differ by {diff}");
    }
}

/// LiTS metrics against medpy (`tests/reference/lits_metrics.py`), on the real liver mask and a
/// prediction made from it: truth = the liver with a tumour ball (radius 3 voxels) at its
/// centroid; prediction = the liver shifted by 2 voxels along i and the tumour ball shifted by
/// one voxel with radius 2 — so every metric is non-trivial. Both are written as NIfTI and the
/// script reads those files; ctseg scores the same arrays on the written file's grid.
#[test]
fn lits_metrics_match_medpy_on_the_real_fixture() {
    let d = tempfile::tempdir().expect("tmp");
    let vol = nifti::read(&liver()).expect("liver");
    let [nx, ny, nz] = vol.dims;
    let liver_mask: Vec<bool> = vol.data.iter().map(|&v| v >= 1.0).collect();
    let at = |x: usize, y: usize, z: usize| x + nx * (y + ny * z);
    let (mut cx, mut cy, mut cz, mut n) = (0.0, 0.0, 0.0, 0.0);
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                if liver_mask[at(x, y, z)] {
                    (cx, cy, cz, n) = (cx + x as f64, cy + y as f64, cz + z as f64, n + 1.0);
                }
            }
        }
    }
    let centre = [cx / n, cy / n, cz / n];
    let ball = |x: usize, y: usize, z: usize, shift: f64, r: f64| {
        let d2 = (x as f64 - centre[0] - shift).powi(2)
            + (y as f64 - centre[1]).powi(2)
            + (z as f64 - centre[2]).powi(2);
        d2 <= r * r
    };
    let (mut truth, mut pred) = (vec![0u8; nx * ny * nz], vec![0u8; nx * ny * nz]);
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let i = at(x, y, z);
                if liver_mask[i] {
                    truth[i] = if ball(x, y, z, 0.0, 3.0) { 2 } else { 1 };
                }
                if x >= 2 && liver_mask[at(x - 2, y, z)] {
                    pred[i] = if ball(x, y, z, 1.0, 2.0) { 2 } else { 1 };
                }
            }
        }
    }
    let (tp, pp) = (d.path().join("truth.nii.gz"), d.path().join("pred.nii.gz"));
    nifti::write_u8(&tp, vol.dims, &vol.affine, &truth).expect("write truth");
    nifti::write_u8(&pp, vol.dims, &vol.affine, &pred).expect("write pred");
    let written = nifti::read(&tp).expect("read back");
    let grid = ctseg::infer::surface::Grid {
        dims: written.dims,
        spacing: written.spacing,
    };
    let case = ctseg::infer::score_case("c", &truth, &pred, &grid, 0.027).expect("score");
    for (structure, ours) in [
        ("liver", &case.liver_metrics),
        ("tumour", &case.tumour_metrics),
    ] {
        let script = common::reference_script("lits_metrics.py");
        let Some(out) = common::python_reference(
            "lits_metrics.py (medpy)",
            &["medpy", "nibabel", "numpy", "scipy"],
            &[
                common::s(&script),
                common::s(&tp),
                common::s(&pp),
                "--structure",
                structure,
            ],
            &[],
        ) else {
            return;
        };
        let want: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        let ours = serde_json::to_value(ours).expect("json");
        for key in [
            "dice",
            "voe",
            "rvd",
            "precision",
            "recall",
            "assd_mm",
            "hd95_mm",
            "hd_mm",
            "asd_truth_mm",
            "asd_pred_mm",
        ] {
            let (a, b) = (ours[key].as_f64(), want[key].as_f64());
            let (Some(a), Some(b)) = (a, b) else {
                panic!(
                    "{structure} {key}: ctseg {} vs medpy {}",
                    ours[key], want[key]
                );
            };
            // The same distances (exact integers × spacing², square-rooted), summed in another
            // order: measured within 3e-16 relative when the script was written.
            assert!(
                (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                "{structure} {key}: ctseg {a} vs medpy {b}"
            );
        }
        eprintln!("{structure}: {ours}");
    }
}

/// `ctseg export --format onnx` → ONNX Runtime: `onnx.checker` accepts the model (full check)
/// and, on the same input, ONNX Runtime's probabilities equal ctseg's own inference within 1e-4
/// (f32 sums in another order: measured about 2e-7 when the writer was tested against the
/// PyTorch peer), with BatchNormalization nodes and with them folded into Mul + Add.
#[test]
fn onnx_export_runs_in_onnxruntime_like_ctseg() {
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    common::ok(common::ctseg(&[
        "train",
        "--config",
        common::TINY,
        "--max-steps",
        "5",
        "--quiet",
        "--out",
        common::s(&run),
    ]));
    // ctseg's own eval-mode output on a closed-form input.
    let be = ctseg::backend::open(&ctseg::backend::DeviceRequest {
        kind: ctseg::backend::BackendKind::Cpu,
        threads: 1,
        adapter: None,
        gpu_conv: Default::default(),
        cooperative_matrices: true,
    })
    .expect("cpu");
    let trained =
        ctseg::train::Trained::open(&run, ctseg::rundir::CheckpointKind::Best).expect("run");
    let model = trained.model(&be, &be.device).expect("model");
    let n = trained.cfg.model.input_size;
    let x: Vec<f32> = (0..3 * n * n)
        .map(|j| (0.5 + 0.4 * (j as f64 * 0.05).sin()) as f32)
        .collect();
    let xt = burn::tensor::Tensor::<4>::from_data(
        burn::tensor::TensorData::new(x.clone(), [3, 1, n, n]),
        &be.device,
    );
    let ours = ctseg::tensor_util::to_f32(model.forward(xt, ctseg::model::Mode::Eval)).expect("y");
    let raw = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    let (xf, yf) = (d.path().join("x.f32"), d.path().join("y.f32"));
    std::fs::write(&xf, raw(&x)).expect("x");
    std::fs::write(&yf, raw(&ours)).expect("y");
    for fold in [false, true] {
        let onnx = d.path().join(format!("model-{fold}.onnx"));
        let mut args = vec![
            "export",
            "--checkpoint",
            common::s(&run),
            "--format",
            "onnx",
        ];
        if fold {
            args.push("--fold-batch-norm");
        }
        args.extend(["--out", common::s(&onnx)]);
        let t = common::ok(common::ctseg(&args));
        assert!(t.contains("ONNX model"), "{t}");
        let script = common::reference_script("onnx_run.py");
        let shape = format!("3,1,{n},{n}");
        let Some(out) = common::python_reference(
            "onnx_run.py (onnx, onnxruntime)",
            &["onnx", "onnxruntime", "numpy"],
            &[
                common::s(&script),
                "--model",
                common::s(&onnx),
                "--input",
                common::s(&xf),
                "--shape",
                &shape,
                "--reference",
                common::s(&yf),
                "--metadata",
            ],
            &[],
        ) else {
            return;
        };
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        assert_eq!(v["checker"], "ok", "{v}");
        assert_eq!(v["outputs"], serde_json::json!([3, 3, n, n]), "{v}");
        let diff = v["max_abs_diff"].as_f64().expect("max_abs_diff");
        eprintln!("ONNX Runtime vs ctseg (fold {fold}): largest difference {diff:.2e}");
        assert!(diff <= 1e-4, "outputs differ by {diff}");
        assert_eq!(
            v["metadata"]["intensity"], "window [-200, 300] HU -> [0, 1]",
            "{v}"
        );
    }
}

/// The raw (gunzipped) bytes of `path` with `edit` applied, written as `dir/name` (gzipped when
/// the name ends in `.gz`).
fn edited(dir: &Path, name: &str, path: &Path, edit: impl Fn(&mut Vec<u8>)) -> PathBuf {
    let mut b = gunzip_file(path);
    edit(&mut b);
    if name.ends_with(".gz") {
        write(dir, name, &common::gzip(&b))
    } else {
        write(dir, name, &b)
    }
}

fn set_f32(h: &mut [u8], off: usize, v: f32) {
    h[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// `ctseg prepare` of the pair through the binary: exit 2 naming the image and each of
/// `needles`, no panic, and nothing left beside the inputs (no output, no temporary folder).
fn prepare_fails_cleanly(image: &Path, label: &Path, needles: &[&str]) {
    let d = tempfile::tempdir().expect("tmp");
    let csv = d.path().join("pairs.csv");
    std::fs::write(&csv, format!("{},{}\n", image.display(), label.display())).expect("csv");
    let out = d.path().join("out");
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut want = vec![name.as_str()];
    want.extend_from_slice(needles);
    common::fails_with(
        common::ctseg(&[
            "prepare",
            "--input",
            common::s(&csv),
            "--out",
            common::s(&out),
            "--size",
            "32",
            "--quiet",
        ]),
        2,
        &want,
    );
    let left: Vec<String> = std::fs::read_dir(d.path())
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "pairs.csv")
        .collect();
    assert!(left.is_empty(), "{name}: left behind: {left:?}");
}

#[test]
fn a_header_claiming_more_data_than_the_file_holds_is_refused_before_allocating() {
    let d = tempfile::tempdir().expect("tmp");
    // vox_offset = 1e20 made `ctseg prepare` panic ("capacity overflow", exit 101): the offset
    // became the size of a buffer. Now it is held against the file's length (.nii) or found
    // missing from the stream (.nii.gz).
    for name in ["offset.nii", "offset.nii.gz"] {
        let f = edited(d.path(), name, &ct(), |b| set_f32(b, 108, 1e20));
        prepare_fails_cleanly(&f, &liver(), &["vox_offset 100000000000000000000"]);
    }
    // dims 32767³ of int16 in a file of a few hundred bytes aborted on allocating 70 TB (exit
    // 134). 32767³ = 35,181,150,961,663 voxels, above the 2³¹ that ctseg reads.
    for name in ["huge.nii", "huge.nii.gz"] {
        let f = edited(d.path(), name, &ct(), |b| {
            b.truncate(400);
            for k in 1..=3 {
                set_i16(b, 40 + 2 * k, i16::MAX);
            }
        });
        prepare_fails_cleanly(
            &f,
            &liver(),
            &["dim = [32767, 32767, 32767]", "35181150961663 voxels"],
        );
    }
    // Within that limit (2000 × 1000 × 1000 int16 = 4 GB) in a 400-byte file: the .nii is
    // refused by its length, the .nii.gz as truncated (its buffer grows only with the stream).
    let big = |b: &mut Vec<u8>| {
        b.truncate(400);
        set_i16(b, 42, 2000);
        set_i16(b, 44, 1000);
        set_i16(b, 46, 1000);
    };
    let f = edited(d.path(), "big.nii", &ct(), big);
    prepare_fails_cleanly(
        &f,
        &liver(),
        &[
            "describe 4000000000 bytes of voxel data",
            "the file has 400 bytes",
        ],
    );
    let f = edited(d.path(), "big.nii.gz", &ct(), big);
    prepare_fails_cleanly(
        &f,
        &liver(),
        &["ends after 48 of 4000000000 bytes of the voxel data"],
    );
}

#[test]
fn a_multi_member_gzip_reads_like_the_single_stream() {
    // bgzip and some converters write a .nii.gz as several gzip members; the reader stopped at
    // the end of the first and called the file truncated. Two members: the two halves.
    let d = tempfile::tempdir().expect("tmp");
    let raw = gunzip_file(&ct());
    let mut two = common::gzip(&raw[..raw.len() / 2]);
    two.extend_from_slice(&common::gzip(&raw[raw.len() / 2..]));
    let f = write(d.path(), "bgzip.nii.gz", &two);
    let a = nifti::read(&ct()).expect("original");
    let b = nifti::read(&f).expect("two members");
    assert_eq!((b.dims, b.affine, b.spacing), (a.dims, a.affine, a.spacing));
    assert!(b.data == a.data, "the voxels differ");
}

#[test]
fn a_corrupt_gzip_member_is_refused_by_its_checksum() {
    // The reader reads the stream to its end, so a flipped byte in the data fails the CRC-32 of
    // its gzip member (stored in the trailer's first 4 bytes).
    let d = tempfile::tempdir().expect("tmp");
    let mut gz = std::fs::read(ct()).expect("read");
    let n = gz.len();
    gz[n - 8] ^= 0x01;
    let f = write(d.path(), "crc.nii.gz", &gz);
    let e = nifti::read(&f).expect_err("corrupt").to_string();
    assert!(e.contains("crc.nii.gz") && e.contains("gzip"), "{e}");
}

#[test]
fn without_sform_and_qform_the_affine_is_nibabels_base_affine() {
    // nibabel 5.4.2 (nib.load(f).affine), for liver.nii.gz with sform_code = qform_code = 0
    // (dims 122 × 101 × 30, pixdim 3): get_base_affine = diag(-3, 3, 3) with the origin at the
    // centre, (dim - 1) / 2 · zoom = (181.5, -150, -43.5). Produced with nibabel 5.4.2 in a
    // venv, the header edited with struct.pack_into as here. The reader used diag(3, 3, 3):
    // the volume came out mirrored left-right.
    let d = tempfile::tempdir().expect("tmp");
    let f = edited(d.path(), "nocodes.nii", &liver(), |b| {
        set_i16(b, 252, 0);
        set_i16(b, 254, 0);
    });
    let v = nifti::read(&f).expect("read");
    let want = [
        [-3.0, 0.0, 0.0, 181.5],
        [0.0, 3.0, 0.0, -150.0],
        [0.0, 0.0, 3.0, -43.5],
    ];
    assert_eq!(v.affine, want);
    // nibabel's header checks on loading: pixdim (-2, 0, 1.5) → zooms (2, 1, 1.5); an invalid
    // code (-2) counts as 0. nibabel 5.4.2 gives [[-2, 0, 0, 121], [0, 1, 0, -50],
    // [0, 0, 1.5, -21.75]].
    let f = edited(d.path(), "fixed.nii", &liver(), |b| {
        set_i16(b, 252, 0);
        set_i16(b, 254, -2);
        set_f32(b, 80, -2.0);
        set_f32(b, 84, 0.0);
        set_f32(b, 88, 1.5);
    });
    let v = nifti::read(&f).expect("read");
    let want = [
        [-2.0, 0.0, 0.0, 121.0],
        [0.0, 1.0, 0.0, -50.0],
        [0.0, 0.0, 1.5, -21.75],
    ];
    assert_eq!(v.affine, want);
    assert_eq!(v.spacing, [2.0, 1.0, 1.5]);
    // The same, live, where nibabel is installed.
    let script = format!(
        "import nibabel as nib\nprint(nib.load({:?}).affine[:3].tolist())",
        f.display().to_string()
    );
    if let Some(out) =
        common::python_reference("nibabel base affine", &["nibabel"], &["-c", &script], &[])
    {
        assert_eq!(
            out.trim(),
            format!("{:?}", want.map(|r| r.to_vec())),
            "nibabel says {out}"
        );
    }
}

/// The CT with its sform's rotation part turned by `degrees` about z.
fn rotated_ct(dir: &Path, name: &str, degrees: f64) -> PathBuf {
    edited(dir, name, &ct(), |b| {
        let (s, c) = degrees.to_radians().sin_cos();
        // sform rows start at 280, 296, 312; the CT's is diag(3, 3, 3).
        set_f32(b, 280, (3.0 * c) as f32);
        set_f32(b, 284, (-3.0 * s) as f32);
        set_f32(b, 296, (3.0 * s) as f32);
        set_f32(b, 300, (3.0 * c) as f32);
    })
}

#[test]
fn oblique_affines_are_refused_with_how_to_resample() {
    let d = tempfile::tempdir().expect("tmp");
    let f = rotated_ct(d.path(), "oblique.nii", 5.0);
    let e = nifti::read(&f).expect_err("oblique").to_string();
    for want in [
        "oblique.nii",
        "oblique",
        "5.000°",
        "resample_to_output",
        "ResampleImageFilter",
    ] {
        assert!(e.contains(want), "{want:?} missing: {e}");
    }
    // 0.01° (sine 1.7e-4) is float rounding, not obliquity: read as axis-aligned.
    let f = rotated_ct(d.path(), "straight.nii", 0.01);
    assert!(nifti::read(&f).is_ok());
}

#[test]
fn a_csv_listing_one_image_twice_is_refused_with_both_rows() {
    // The same volume on two rows became two volumes that the fold assignment could put into
    // training and validation. Compared after resolving paths: `./x` and `/abs/x` are one file.
    let d = tempfile::tempdir().expect("tmp");
    std::fs::copy(ct(), d.path().join("ct.nii.gz")).expect("copy");
    std::fs::copy(liver(), d.path().join("seg.nii.gz")).expect("copy");
    let csv = d.path().join("cases.csv");
    std::fs::write(
        &csv,
        format!(
            "image,label\nct.nii.gz,seg.nii.gz\n# a comment\n{},seg.nii.gz\n",
            d.path().join("./ct.nii.gz").display()
        ),
    )
    .expect("csv");
    let e = prepare::find_pairs(&csv)
        .expect_err("duplicate")
        .to_string();
    assert!(
        e.contains("cases.csv") && e.contains("line 4") && e.contains("line 2"),
        "{e}"
    );
}

#[test]
fn area_resized_training_data_makes_prediction_resize_by_area() {
    let d = tempfile::tempdir().expect("tmp");
    let lits = lits_folder(d.path(), 2);
    let (ds, run) = prepare_and_train(d.path(), &lits, &["--resize", "area"], 2);
    let manifest = std::fs::read_to_string(ds.join("dataset.json")).expect("manifest");
    assert!(manifest.contains("\"resize\": \"area\""), "{manifest}");
    let trained =
        ctseg::train::Trained::open(&run, ctseg::rundir::CheckpointKind::Last).expect("checkpoint");
    assert_eq!(
        trained.ck.meta.provenance.resize,
        Resize::Area,
        "the checkpoint records it"
    );
    assert_eq!(
        ctseg::infer::Predictor::input_resize(&trained),
        Resize::Area
    );
    let mask = d.path().join("mask.nii.gz");
    let t = common::ok(common::ctseg(&[
        "predict",
        "--checkpoint",
        common::s(&run),
        "--input",
        common::s(&ct()),
        "--output",
        common::s(&mask),
    ]));
    assert!(t.contains("by area"), "{t}");
}

/// No command writes over one of its own inputs: `predict --output` naming its input (directly
/// or through a symlink) and `export --out` naming the run's checkpoint exit 2 naming the flag,
/// and leave the files byte for byte as they were.
#[test]
fn predict_and_export_never_write_over_their_inputs() {
    let d = tempfile::tempdir().expect("tmp");
    let run = d.path().join("run");
    common::ok(common::ctseg(&[
        "train",
        "--config",
        common::TINY,
        "--max-steps",
        "2",
        "--quiet",
        "--out",
        common::s(&run),
    ]));
    let input = d.path().join("ct.nii.gz");
    std::fs::copy(ct(), &input).expect("copy");
    let link = d.path().join("link.nii.gz");
    std::os::unix::fs::symlink(&input, &link).expect("symlink");
    let before = std::fs::read(&input).expect("read");
    for out in [&input, &link] {
        common::fails_with(
            common::ctseg(&[
                "predict",
                "--checkpoint",
                common::s(&run),
                "--input",
                common::s(&input),
                "--output",
                common::s(out),
            ]),
            2,
            &["--output", "ct.nii.gz"],
        );
        assert!(
            std::fs::read(&input).expect("read") == before,
            "the CT is untouched"
        );
    }
    let ck = run.join("checkpoint.ctck");
    let ck_before = std::fs::read(&ck).expect("checkpoint");
    common::fails_with(
        common::ctseg(&[
            "export",
            "--checkpoint",
            common::s(&run),
            "--out",
            common::s(&ck),
        ]),
        2,
        &["--out", "checkpoint.ctck"],
    );
    assert!(
        std::fs::read(&ck).expect("checkpoint") == ck_before,
        "the checkpoint is untouched"
    );
}

#[test]
fn evaluate_refuses_a_voxel_size_that_is_not_finite_naming_pixdim_and_writes_no_mask() {
    // A NaN pixdim reached `evaluate`'s surface distances, which failed with exit 1 after
    // the case's mask was written, naming neither the file nor the field.
    let model = lits_model();
    let d = tempfile::tempdir().expect("tmp");
    let image = edited(d.path(), "nan.nii.gz", &ct(), |b| set_f32(b, 80, f32::NAN));
    let csv = d.path().join("cases.csv");
    std::fs::write(&csv, format!("{},{}\n", image.display(), liver().display())).expect("csv");
    let out = d.path().join("eval");
    common::fails_with(
        common::ctseg(&[
            "evaluate",
            "--checkpoint",
            common::s(&model.run),
            "--input",
            common::s(&csv),
            "--out",
            common::s(&out),
            "--save-masks",
        ]),
        2,
        &["nan.nii.gz", "pixdim[1] = NaN", "finite voxel size"],
    );
    assert!(!out.join("nan-pred.nii.gz").exists(), "no mask written");
}

#[test]
fn predict_needs_only_the_affine_so_a_non_finite_pixdim_still_predicts() {
    // nibabel loads such a file (its sform gives the grid); predicting never uses pixdim.
    let model = lits_model();
    let d = tempfile::tempdir().expect("tmp");
    let image = edited(d.path(), "inf.nii", &ct(), |b| {
        set_f32(b, 88, f32::INFINITY)
    });
    let mask = d.path().join("mask.nii.gz");
    common::ok(common::ctseg(&[
        "predict",
        "--checkpoint",
        common::s(&model.run),
        "--input",
        common::s(&image),
        "--output",
        common::s(&mask),
    ]));
    assert!(mask.is_file());
}

#[test]
fn predict_refuses_two_inputs_that_would_share_a_mask_before_any_work() {
    // `a.nii` and `a.nii.gz` both map to `a-pred.nii.gz`: the second mask replaced the first.
    // Refused before the checkpoint is even opened (it does not exist here).
    let d = tempfile::tempdir().expect("tmp");
    let input = d.path().join("in");
    std::fs::create_dir(&input).expect("mkdir");
    std::fs::copy(ct(), input.join("a.nii.gz")).expect("copy");
    std::fs::write(input.join("a.nii"), gunzip_file(&ct())).expect("write");
    let out = d.path().join("out");
    common::fails_with(
        common::ctseg(&[
            "predict",
            "--checkpoint",
            common::s(&d.path().join("no-run")),
            "--input",
            common::s(&input),
            "--output",
            common::s(&out),
        ]),
        2,
        &["--output", "a-pred.nii.gz", "a.nii ", "a.nii.gz"],
    );
    assert!(!out.exists(), "nothing written");
}

/// A case list in `root` of two cases named `ct.nii.gz`, in folders `one` and `two`.
fn two_cases_named_alike(root: &Path) -> PathBuf {
    for case in ["one", "two"] {
        std::fs::create_dir(root.join(case)).expect("mkdir");
        std::fs::copy(ct(), root.join(case).join("ct.nii.gz")).expect("copy");
        std::fs::copy(liver(), root.join(case).join("seg.nii.gz")).expect("copy");
    }
    let csv = root.join("cases.csv");
    std::fs::write(
        &csv,
        "image,label\none/ct.nii.gz,one/seg.nii.gz\ntwo/ct.nii.gz,two/seg.nii.gz\n",
    )
    .expect("csv");
    csv
}

#[test]
fn evaluate_names_each_case_by_its_path_under_the_case_list() {
    // Two cases named `ct.nii.gz` in two folders were both `ct.nii.gz` in the results.
    let model = lits_model();
    let d = tempfile::tempdir().expect("tmp");
    let csv = two_cases_named_alike(d.path());
    let out = d.path().join("eval");
    common::ok(common::ctseg(&[
        "evaluate",
        "--checkpoint",
        common::s(&model.run),
        "--input",
        common::s(&csv),
        "--out",
        common::s(&out),
    ]));
    let table = std::fs::read_to_string(out.join("evaluation.csv")).expect("csv");
    let cases: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next())
        .collect();
    assert_eq!(cases, ["one/ct.nii.gz", "two/ct.nii.gz"], "{table}");
}

#[test]
fn evaluate_quotes_a_case_path_holding_a_comma_in_its_csv() {
    // A LiTS folder in a sub-folder named `batch,1`: unquoted, the name split into two columns.
    let model = lits_model();
    let d = tempfile::tempdir().expect("tmp");
    let sub = d.path().join("batch,1");
    std::fs::create_dir(&sub).expect("mkdir");
    std::fs::copy(ct(), sub.join("volume-0.nii.gz")).expect("copy");
    std::fs::copy(liver(), sub.join("segmentation-0.nii.gz")).expect("copy");
    let out = d.path().join("eval");
    common::ok(common::ctseg(&[
        "evaluate",
        "--checkpoint",
        common::s(&model.run),
        "--input",
        common::s(d.path()),
        "--out",
        common::s(&out),
    ]));
    let table = std::fs::read_to_string(out.join("evaluation.csv")).expect("csv");
    let row = table.lines().nth(1).expect("one case");
    assert!(row.starts_with("\"batch,1/volume-0.nii.gz\","), "{table}");
}

#[test]
fn evaluate_refuses_two_cases_that_would_share_a_saved_mask_before_any_work() {
    // Two cases named `ct.nii.gz` in different folders: `--save-masks` wrote both to
    // `ct-pred.nii.gz`.
    let d = tempfile::tempdir().expect("tmp");
    let csv = two_cases_named_alike(d.path());
    let out = d.path().join("eval");
    common::fails_with(
        common::ctseg(&[
            "evaluate",
            "--checkpoint",
            common::s(&d.path().join("no-run")),
            "--input",
            common::s(&csv),
            "--out",
            common::s(&out),
            "--save-masks",
        ]),
        2,
        &["--out", "ct-pred.nii.gz", "one/ct.nii.gz", "two/ct.nii.gz"],
    );
    assert!(!out.exists(), "nothing written");
}

#[test]
fn predict_of_a_folder_creates_no_output_folder_when_the_checkpoint_is_refused() {
    // The output folder used to be made before the checkpoint was opened.
    let d = tempfile::tempdir().expect("tmp");
    let input = d.path().join("cts");
    std::fs::create_dir(&input).expect("mkdir");
    std::fs::copy(ct(), input.join("a.nii.gz")).expect("copy");
    let out = d.path().join("masks");
    common::fails_with(
        common::ctseg(&[
            "predict",
            "--checkpoint",
            common::s(&d.path().join("no-such-run")),
            "--input",
            common::s(&input),
            "--output",
            common::s(&out),
        ]),
        2,
        &["no-such-run", "not found"],
    );
    assert!(!out.exists(), "no output folder");
}

#[test]
fn predict_refuses_a_model_without_a_tumour_channel_naming_the_checkpoint() {
    // A 2-class model (background, liver) trains, but predict needs the tumour channel; it
    // used to fail after the first batch with exit status 1.
    let d = tempfile::tempdir().expect("tmp");
    let config = common::write_config(d.path(), "two.toml", |t| {
        t.replace("classes = 3", "classes = 2")
    });
    let run = d.path().join("run");
    common::ok(common::ctseg(&[
        "train",
        "--config",
        common::s(&config),
        "--max-steps",
        "1",
        "--quiet",
        "--out",
        common::s(&run),
    ]));
    let out = d.path().join("mask.nii.gz");
    common::fails_with(
        common::ctseg(&[
            "predict",
            "--checkpoint",
            common::s(&run),
            "--input",
            common::s(&ct()),
            "--output",
            common::s(&out),
        ]),
        2,
        &["run/best.ctck", "model.classes = 2"],
    );
    assert!(!out.exists(), "nothing written");
}
