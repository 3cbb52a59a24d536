//! What `--gpu-conv auto` measured on an adapter, kept across runs: one small JSON file per
//! adapter, build and workload under the kernel cache directory, so that a second run (a resume,
//! `predict` after `train`) skips the timing and takes the same path.
//!
//! A kept timing is used only for the same adapter and driver version, the same executable (a
//! rebuild may change either path's kernels) and the same layers, batch and workload. Only
//! what was timed is kept, a failure while timed included; a later refusal by the start-up
//! check is not (it checks the whole model, which the key does not describe). A file
//! that cannot be read or does not match is treated as absent and replaced by the next
//! timing: the cache only saves time, it never fails a run. Deleting the directory times again.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::conv_choice::Timing;
use super::kernels::KernelCase;

/// Where a choice's timing came from, for the log and `summary.json`'s `gpu_conv`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kept {
    /// Read from `file`, timed by an earlier run.
    Read {
        /// The file (delete it to time again).
        file: PathBuf,
    },
    /// Timed now and written to `file` for later runs.
    Written {
        /// The file.
        file: PathBuf,
    },
    /// Timed now; writing `file` failed (`error`), so the next run times again.
    NotWritten {
        /// The file.
        file: PathBuf,
        /// Why.
        error: String,
    },
}

impl Kept {
    /// A clause for the choice's one-line description.
    pub fn describe(&self) -> String {
        match self {
            Kept::Read { file } => format!(
                "timed by an earlier run, kept in {} (--gpu-conv retime times again)",
                file.display()
            ),
            Kept::Written { file } => format!("kept for later runs in {}", file.display()),
            Kept::NotWritten { file, error } => {
                format!("could not be kept in {}: {error}", file.display())
            }
        }
    }

    /// The file it names, if it holds this run's timing (read, or written now).
    pub fn file(&self) -> Option<&Path> {
        match self {
            Kept::Read { file } | Kept::Written { file } => Some(file),
            Kept::NotWritten { .. } => None,
        }
    }
}

/// What a kept timing is valid for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Key {
    /// The adapter as wgpu names it, with its driver's version ([`crate::backend::Backend`]).
    pub adapter: String,
    /// The executable's size and CRC-32 ([`build`]).
    pub build: String,
    /// Forward and gradients (`true`) or the forward alone.
    pub train: bool,
    /// Each layer timed (`B,C,H,W,CO`, the timed batch first) and how often the model runs it.
    pub layers: Vec<(String, usize)>,
}

impl Key {
    /// The key for timing `layers` with (`train`) or without gradients on `adapter`, in this
    /// executable; `None` where the executable cannot be read (nothing is then kept).
    pub fn new(adapter: &str, train: bool, layers: &[(KernelCase, usize)]) -> Option<Self> {
        Some(Self {
            adapter: adapter.to_string(),
            build: build()?.to_string(),
            train,
            layers: layers.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
        })
    }

    /// The key's file under `dir`: named by the CRC-32 of the key, which the file also holds
    /// in full (two keys sharing a name replace each other's file; neither is misread).
    pub fn file(&self, dir: &Path) -> PathBuf {
        let text = serde_json::to_string(self).unwrap_or_default();
        dir.join(format!("{:08x}.json", crc32fast::hash(text.as_bytes())))
    }
}

/// A kept timing's file.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    key: Key,
    timing: Timing,
    /// Seconds since 1970 when it was timed.
    timed_at_unix: u64,
}

/// The executable's size and CRC-32, read once per process; `None` where it cannot be read.
/// A test build whose convolution kernels are broken on purpose (`crate::faults`) is another
/// build: what it times is kept apart from the real kernels' timings.
pub fn build() -> Option<&'static str> {
    static BUILD: OnceLock<Option<String>> = OnceLock::new();
    BUILD
        .get_or_init(|| {
            let bytes = std::fs::read(std::env::current_exe().ok()?).ok()?;
            let broken = crate::faults::wgsl_conv_broken();
            Some(format!(
                "{} bytes, crc32 {:08x}{}",
                bytes.len(),
                crc32fast::hash(&bytes),
                if broken {
                    ", ctseg's convolutions broken by CTSEG_FAULT_INJECT"
                } else {
                    ""
                }
            ))
        })
        .as_deref()
}

/// The timing kept under `dir` for `key`, with its file; `None` where there is none, or the
/// file is unreadable, corrupt or for another key.
pub fn read(dir: &Path, key: &Key) -> Option<(Timing, PathBuf)> {
    let file = key.file(dir);
    let text = std::fs::read_to_string(&file).ok()?;
    let entry: Entry = serde_json::from_str(&text).ok()?;
    let valid = entry.timing.burn_s.is_finite() && entry.timing.wgsl_s.is_finite();
    (entry.key == *key && valid).then_some((entry.timing, file))
}

/// Keeps `timing` under `dir` for `key` (atomically: ranks sharing the directory replace each
/// other's file whole), and says where.
pub fn write(dir: &Path, key: &Key, timing: &Timing) -> Kept {
    let file = key.file(dir);
    let entry = Entry {
        key: key.clone(),
        timing: timing.clone(),
        timed_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let written = std::fs::create_dir_all(dir)
        .map_err(|e| e.to_string())
        .and_then(|()| serde_json::to_vec_pretty(&entry).map_err(|e| e.to_string()))
        .and_then(|bytes| crate::util::fs::write_atomic(&file, &bytes).map_err(|e| e.to_string()));
    match written {
        Ok(()) => Kept::Written { file },
        Err(error) => Kept::NotWritten { file, error },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(adapter: &str, train: bool, batch: usize) -> Key {
        let layers = [(KernelCase::new([batch, 4, 16, 16], 4), 2)];
        Key::new(adapter, train, &layers).expect("the test binary is readable")
    }

    fn timing() -> Timing {
        Timing {
            burn_s: 2.5,
            wgsl_s: 1.25,
            failure: None,
        }
    }

    #[test]
    fn a_written_timing_is_read_back_for_the_same_key() {
        let d = tempfile::tempdir().expect("tmp");
        let k = key("lavapipe | llvmpipe 22", true, 2);
        let Kept::Written { file } = write(d.path(), &k, &timing()) else {
            panic!("not written")
        };
        assert_eq!(read(d.path(), &k), Some((timing(), file)));
    }

    #[test]
    fn a_failure_is_kept_with_its_reason() {
        let d = tempfile::tempdir().expect("tmp");
        let k = key("a", true, 2);
        let failed = Timing {
            failure: Some("shader did not compile".into()),
            ..timing()
        };
        write(d.path(), &k, &failed);
        assert_eq!(read(d.path(), &k).map(|(t, _)| t), Some(failed));
    }

    #[test]
    fn another_adapter_driver_workload_or_batch_reads_nothing() {
        let d = tempfile::tempdir().expect("tmp");
        write(d.path(), &key("gpu | driver 1.0", true, 2), &timing());
        for other in [
            key("gpu | driver 1.1", true, 2),
            key("gpu | driver 1.0", false, 2),
            key("gpu | driver 1.0", true, 4),
        ] {
            assert_eq!(read(d.path(), &other), None, "{other:?}");
        }
    }

    #[test]
    fn another_build_reads_nothing() {
        let d = tempfile::tempdir().expect("tmp");
        let k = key("a", true, 2);
        write(d.path(), &k, &timing());
        let rebuilt = Key {
            build: "1 bytes, crc32 00000000".into(),
            ..k
        };
        assert_eq!(read(d.path(), &rebuilt), None);
    }

    #[test]
    fn a_corrupt_or_foreign_file_reads_as_absent() {
        let d = tempfile::tempdir().expect("tmp");
        let k = key("a", true, 2);
        let file = k.file(d.path());
        for text in [
            "{\"key\": ".to_string(),
            "[]".to_string(),
            // Another key's entry under this key's name (a CRC-32 collision).
            serde_json::to_string(&Entry {
                key: key("b", true, 2),
                timing: timing(),
                timed_at_unix: 0,
            })
            .expect("json"),
        ] {
            std::fs::write(&file, text).expect("write");
            assert_eq!(read(d.path(), &k), None);
        }
        // The next timing replaces it.
        write(d.path(), &k, &timing());
        assert!(read(d.path(), &k).is_some());
    }

    #[test]
    fn an_unwritable_directory_says_why_and_fails_nothing() {
        let d = tempfile::tempdir().expect("tmp");
        // A file where the directory should be.
        let blocked = d.path().join("conv-choice");
        std::fs::write(&blocked, "").expect("write");
        let kept = write(&blocked, &key("a", true, 2), &timing());
        assert!(
            matches!(&kept, Kept::NotWritten { error, .. } if !error.is_empty()),
            "{kept:?}"
        );
        assert!(kept.describe().contains("could not be kept"), "{kept:?}");
    }
}
