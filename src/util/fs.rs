//! File output, in one place: every file ctseg writes goes through an atomic writer (a temporary
//! sibling, fsync, rename), so a crash, a full disk or a second signal never leaves a
//! half-written file in place of a good one (streams aside: `metrics.jsonl` is appended, its
//! torn last line dropped on reading, and `bench scaling` streams its runs' logs); and every
//! command checks its outputs against its inputs with [`refuse_overwriting_inputs`] (and against
//! each other with [`refuse_shared_outputs`]) before it writes, so no command replaces what it
//! reads or what it wrote a moment before.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The directory holding `path` (`.` for a bare file name).
fn parent_of(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A hidden temporary name beside `path`, unique to this process.
fn temp_sibling(path: &Path, fallback: &str) -> PathBuf {
    let name = path.file_name().map_or_else(
        || fallback.to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    parent_of(path).join(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `path` atomically: `fill` writes into a temporary sibling file, which is fsynced and
/// renamed over `path` (then the directory is fsynced). On any error the temporary file is
/// removed and `path` is untouched.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temp_sibling(path, "file");
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(parent_of(path)) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Writes `bytes` to `path` atomically (see [`write_atomic_with`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Creates directory `dir` atomically: `fill` writes into a temporary sibling directory that
/// is renamed to `dir` when it succeeds and removed when it fails, so a failure leaves nothing
/// behind. `dir` must not exist yet (an error of kind [`Error::Argument`] says so).
pub fn create_dir_atomic<T>(dir: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    if dir.exists() {
        return Err(Error::Argument(format!(
            "{}: already exists; choose a new output directory",
            dir.display()
        )));
    }
    let parent = parent_of(dir);
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = temp_sibling(dir, "dir");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    // Removes the temporary directory however `fill` ends: an error, or a panic unwinding.
    struct Cleanup<'a>(Option<&'a Path>);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            if let Some(p) = self.0 {
                let _ = fs::remove_dir_all(p);
            }
        }
    }
    let mut cleanup = Cleanup(Some(&tmp));
    let v = fill(&tmp)?;
    fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    cleanup.0 = None;
    Ok(v)
}

/// `path` with symlinks and `..` resolved: the file itself when it exists, else its resolved
/// parent joined with its name (an output that does not exist yet).
pub fn resolve(path: &Path) -> PathBuf {
    if let Ok(p) = fs::canonicalize(path) {
        return p;
    }
    let parent = fs::canonicalize(parent_of(path)).unwrap_or_else(|_| parent_of(path));
    match path.file_name() {
        Some(name) => parent.join(name),
        None => parent,
    }
}

/// Whether `a` and `b` are the same file: the same resolved path, or (Unix) the same device and
/// inode, which also catches hard links.
fn same_file(a: &Path, b: &Path) -> bool {
    if resolve(a) == resolve(b) {
        return true;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (fs::metadata(a), fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    false
}

/// The output-safety policy: refuses (exit 2, naming both) when `output` is one of `inputs`,
/// or lies inside an input directory where it would replace one of its files. Checked before
/// any work starts, after resolving symlinks, `..` and hard links.
pub fn refuse_overwriting_inputs(flag: &str, output: &Path, inputs: &[&Path]) -> Result<()> {
    for input in inputs {
        if same_file(output, input) {
            return Err(Error::Argument(format!(
                "{flag} {}: is the input {} itself; refusing to overwrite an input (choose another output)",
                output.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

/// Refuses (exit 2, naming both inputs) when two of `jobs`' (input, output) pairs would write
/// the same output, before any work starts: the second would silently replace the first.
/// Paths are compared as given: the callers' outputs are names generated in one folder.
pub fn refuse_shared_outputs<'a>(
    flag: &str,
    jobs: impl IntoIterator<Item = (&'a Path, &'a Path)>,
) -> Result<()> {
    let mut seen: std::collections::HashMap<&Path, &Path> = std::collections::HashMap::new();
    for (input, output) in jobs {
        if let Some(first) = seen.insert(output, input) {
            return Err(Error::Argument(format!(
                "{flag} {}: the outputs of both {} and {} would be written there; refusing to let one replace the other (rename one input)",
                output.display(),
                first.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .map(|r| {
                r.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn atomic_write_replaces_whole_and_leaves_no_temporary() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("a.txt");
        write_atomic(&p, b"one").expect("first");
        write_atomic(&p, b"two").expect("second");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        assert_eq!(names(d.path()), ["a.txt"]);
    }

    #[test]
    fn a_failing_writer_keeps_the_old_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("a.txt");
        write_atomic(&p, b"good").expect("write");
        let e = write_atomic_with(&p, |f| {
            f.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(e.is_err());
        assert_eq!(fs::read(&p).expect("read"), b"good");
        assert_eq!(names(d.path()), ["a.txt"]);
    }

    #[test]
    fn atomic_directory_is_all_or_nothing() {
        let d = tempfile::tempdir().expect("tempdir");
        let out = d.path().join("ds");
        let e = create_dir_atomic(&out, |tmp| -> Result<()> {
            fs::write(tmp.join("x"), b"1").map_err(|e| Error::io(tmp, e))?;
            Err(Error::Invalid("bad volume".into()))
        });
        assert!(e.is_err());
        assert!(names(d.path()).is_empty(), "{:?}", names(d.path()));
        create_dir_atomic(&out, |tmp| {
            fs::write(tmp.join("x"), b"1").map_err(|e| Error::io(tmp, e))
        })
        .expect("second try");
        assert_eq!(names(&out), ["x"]);
        let e = create_dir_atomic(&out, |_| Ok(()))
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("already exists")));
    }

    #[test]
    fn an_output_that_is_an_input_is_refused_through_links() {
        let d = tempfile::tempdir().expect("tempdir");
        let input = d.path().join("ct.nii.gz");
        fs::write(&input, b"ct").expect("write");
        let sub = d.path().join("sub");
        fs::create_dir(&sub).expect("mkdir");
        let dotted = sub.join("..").join("ct.nii.gz");
        let link = d.path().join("link.nii.gz");
        let hard = d.path().join("hard.nii.gz");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&input, &link).expect("symlink");
        fs::hard_link(&input, &hard).expect("hard link");
        for out in [&input, &dotted, &link, &hard] {
            let e = refuse_overwriting_inputs("--output", out, &[&input])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                e.contains("--output") && e.contains("refusing"),
                "{out:?}: {e}"
            );
        }
        let other = d.path().join("mask.nii.gz");
        assert!(refuse_overwriting_inputs("--output", &other, &[&input]).is_ok());
    }
}
