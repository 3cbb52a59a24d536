//! The run directory's lock: an exclusive advisory lock (`flock`) on `.lock`, held by rank 0 of
//! the job that trains in the directory, so that two jobs (a Slurm array that got the same
//! `--out`, a second `--resume` of a running job) cannot append to one metrics log and replace
//! each other's checkpoints. The kernel drops the lock when the process dies, so a crashed job
//! leaves no stale lock behind.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::error::{Error, Result};

/// A held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

/// Who holds a lock: `pid N on HOST (Slurm job J)`, as written into the file.
fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown host".into());
    let job = std::env::var("SLURM_JOB_ID")
        .map(|j| format!(" (Slurm job {j})"))
        .unwrap_or_default();
    format!("pid {} on {host}{job}", std::process::id())
}

impl RunLock {
    /// Takes the lock of the run directory `dir` (which must exist), or fails at once, naming
    /// the holder, when another process has it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(super::LOCK);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut who = String::new();
                let _ = file.read_to_string(&mut who);
                return Err(Error::Argument(format!(
                    "{}: the run directory is in use by another job ({}); wait for it to end, or choose another --out",
                    dir.display(),
                    if who.trim().is_empty() {
                        "holder unknown"
                    } else {
                        who.trim()
                    }
                )));
            }
            Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        let me = holder();
        let written = file
            .set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(me.as_bytes()));
        written.map_err(|e| Error::io(&path, e))?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_named_until_the_first_lets_go() {
        let d = tempfile::tempdir().expect("tempdir");
        let first = RunLock::acquire(d.path()).expect("first");
        let e = RunLock::acquire(d.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("in use by another job")
                && e.contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        drop(first);
        assert!(RunLock::acquire(d.path()).is_ok());
    }
}
