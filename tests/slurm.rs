//! ctseg under Slurm, for real: a one-node cluster (Debian's slurmctld, slurmd and munge,
//! started and stopped by `scripts/slurm/cluster.sh` under a temporary directory) runs
//! `srun -n 2 --mpi=pmix ctseg train` (the same final weights as `mpirun -np 2`), the job script
//! `scripts/slurm/ctseg.sbatch` stopped by a preemption warning mid-run (it checkpoints, exits 4,
//! requeues itself and resumes to the uninterrupted run's weights), and `bench scaling` with an
//! srun launcher. Every wait is bounded; the cluster is stopped on every exit path.
//!
//! Needs root and the packages `scripts/test` installs; without them the test fails in CI and
//! is skipped elsewhere.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts/slurm")
        .join(name)
}

/// The running cluster; stopped when dropped (also when the test panics).
struct Cluster {
    state: tempfile::TempDir,
    conf: String,
}

impl Cluster {
    fn start() -> Option<Self> {
        let have = Command::new("sh")
            .args(["-c", "command -v slurmctld && command -v munged"])
            .output()
            .is_ok_and(|o| o.status.success());
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if !(have && root) {
            assert!(
                !references_required(),
                "the Slurm test needs root and Slurm (scripts/test installs slurmctld, slurmd, munge)"
            );
            eprintln!("not run here: needs root and Slurm (slurmctld, munged)");
            return None;
        }
        let state = tempfile::Builder::new()
            .prefix("ctseg-slurm")
            .tempdir()
            .expect("tmp");
        let o = Command::new("timeout")
            .arg("120")
            .arg(script("cluster.sh"))
            .arg("start")
            .arg(state.path())
            .env("SLURM_TEST_CPUS", "4")
            .output()
            .expect("cluster.sh");
        assert!(o.status.success(), "cluster start:\n{}", text(&o));
        let conf = state.path().join("slurm.conf").display().to_string();
        Some(Self { state, conf })
    }

    /// A Slurm client command with this cluster's configuration, under a timeout.
    fn cmd(&self, timeout_s: u64, program: &str) -> Command {
        let mut c = Command::new("timeout");
        c.arg(timeout_s.to_string())
            .arg(program)
            .env("SLURM_CONF", &self.conf);
        c
    }

    /// `scontrol show job ID`, or "" once the job is gone.
    fn job(&self, id: &str) -> String {
        self.cmd(30, "scontrol")
            .args(["show", "job", id])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("timeout")
            .arg("120")
            .arg(script("cluster.sh"))
            .arg("stop")
            .arg(self.state.path())
            .output();
    }
}

/// The "final weights hash" of each rank in a job's output.
fn hashes(t: &str) -> Vec<String> {
    t.lines()
        .filter_map(|l| l.split("final weights hash ").nth(1))
        .map(|h| h.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

/// Waits (bounded) until `ok` holds, polling every 200 ms.
fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ok_out(o: Output, what: &str) -> String {
    let t = text(&o);
    assert!(o.status.success(), "{what} failed ({}):\n{t}", o.status);
    t
}

#[test]
fn srun_sbatch_preemption_and_bench_scaling_on_a_one_node_cluster() {
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let d = tempfile::tempdir().expect("tmp");

    // 1. srun: 2 ranks through PMIx end with the weights of the same job under mpirun.
    let train = |out: &Path| -> Vec<String> {
        vec![
            "train".into(),
            "--config".into(),
            TINY.into(),
            "--out".into(),
            out.display().to_string(),
            "--quiet".into(),
            "--threads".into(),
            "1".into(),
        ]
    };
    let srun = cluster
        .cmd(300, "srun")
        .args(["-n", "2", "--mpi=pmix"])
        .arg(bin())
        .args(train(&d.path().join("srun")))
        .output()
        .expect("srun");
    let srun_hashes = hashes(&ok_out(srun, "srun -n 2"));
    let args = train(&d.path().join("mpirun"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mpi_hashes = hashes(&ok(mpirun(2, &args, &[], 300)));
    assert_eq!(srun_hashes.len(), 2, "{srun_hashes:?}");
    assert!(srun_hashes.iter().all(|h| *h == srun_hashes[0]));
    assert_eq!(
        srun_hashes, mpi_hashes,
        "srun and mpirun trained different models"
    );

    // 2. The job script, stopped by a preemption warning mid-run: it checkpoints, exits 4,
    // requeues itself, resumes, and ends with the uninterrupted run's weights.
    let job_dir = d.path().join("job");
    let long = ["--quiet", "--epochs", "150"];
    let mut reference = train(&d.path().join("reference"));
    reference.extend(long.iter().skip(1).map(|s| s.to_string()));
    let reference: Vec<&str> = reference.iter().map(String::as_str).collect();
    let reference_hash = hashes(&ok(mpirun(2, &reference, &[], 600)));
    let out_file = d.path().join("job.out");
    let submitted = cluster
        .cmd(60, "sbatch")
        .args([
            "--parsable",
            "--nodes=1",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            "--time=10",
            "--signal=B:USR1@300",
        ])
        .arg(format!("--output={}", out_file.display()))
        .arg(script("ctseg.sbatch"))
        .env("CTSEG", bin())
        .env("CONFIG", TINY)
        .env("RUN_DIR", &job_dir)
        .env("EXTRA_ARGS", long.join(" "))
        .env("SRUN_ARGS", "--ntasks-per-node=2")
        .current_dir(d.path())
        .output()
        .expect("sbatch");
    let id = ok_out(submitted, "sbatch").trim().to_string();
    wait_for("the job's first steps", Duration::from_secs(120), || {
        std::fs::read_to_string(job_dir.join("metrics.jsonl"))
            .is_ok_and(|m| m.lines().filter(|l| l.contains("\"step\"")).count() >= 2)
    });
    // The warning `--signal=B:USR1` would send, at a moment of the test's choosing.
    ok_out(
        cluster
            .cmd(30, "scancel")
            .args(["--batch", "--signal=USR1", &id])
            .output()
            .expect("scancel"),
        "scancel --signal=USR1",
    );
    wait_for("the requeued job to end", Duration::from_secs(300), || {
        let j = cluster.job(&id);
        let ended = ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"]
            .iter()
            .any(|s| j.contains(&format!("JobState={s}")));
        j.is_empty() || (ended && !j.contains("Restarts=0"))
    });
    let log = std::fs::read_to_string(&out_file).unwrap_or_default();
    let job = cluster.job(&id);
    assert!(log.contains("requeueing (restart 1)"), "{log}\n{job}");
    assert!(log.contains("resuming"), "{log}");
    assert!(log.contains("stopped on a signal after step"), "{log}");
    assert!(
        job.is_empty() || job.contains("ExitCode=0:0"),
        "the resumed job did not succeed:\n{job}\n{log}"
    );
    let final_hashes = hashes(&log);
    assert_eq!(
        final_hashes.last(),
        reference_hash.last(),
        "stopped + resumed under Slurm is not the uninterrupted run:\n{log}"
    );
    let steps: Vec<u64> = metrics(&job_dir).steps.iter().map(|s| s.step).collect();
    assert_eq!(
        steps,
        (1..=steps.len() as u64).collect::<Vec<_>>(),
        "steps lost or repeated"
    );

    // 3. bench scaling through an srun launcher.
    let sc = d.path().join("scaling");
    let o = cluster
        .cmd(600, &bin())
        .args(["bench", "scaling", "--config", TINY, "--ranks", "1,2"])
        .args(["--launcher", "srun -n {n} --mpi=pmix", "--out"])
        .arg(&sc)
        .args(["--", "--max-steps", "4", "--threads", "1"])
        .output()
        .expect("bench scaling");
    ok_out(o, "bench scaling");
    let rows: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(sc.join("scaling.json")).expect("scaling.json"),
    )
    .expect("json");
    assert_eq!(rows.as_array().map(Vec::len), Some(2), "{rows}");
    drop(cluster);
}
