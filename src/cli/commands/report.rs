//! `ctseg report`, `ctseg model` and `ctseg adapters`: what runs, configs and machines hold.

use std::path::PathBuf;

use anyhow::Result;

use ctseg::backend;
use ctseg::error::Error;
use ctseg::model::summarize_with_inputs;
use ctseg::rundir::RunDir;

use crate::cli::args::{ModelArgs, ReportArgs, load_config};

/// `ctseg report`: the study's exhibits for a set of runs.
pub fn report(a: ReportArgs) -> Result<()> {
    // A directory that is not a run but holds run directories stands for them.
    let mut dirs = Vec::new();
    for d in &a.runs {
        // A run, or a path that is no directory at all: the report's reader names it.
        if RunDir::is_run(d) || !d.is_dir() {
            dirs.push(d.clone());
            continue;
        }
        let entries = std::fs::read_dir(d).map_err(|e| Error::io(d, e))?;
        let mut inner: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| RunDir::is_run(p))
            .collect();
        inner.sort();
        if inner.is_empty() {
            return Err(Error::Argument(format!(
                "{}: neither a run directory (no metrics.jsonl or summary.json) nor a folder of them",
                d.display()
            ))
            .into());
        }
        dirs.extend(inner);
    }
    let out = ctseg::report::report(
        &dirs,
        &a.out,
        &ctseg::report::ReportOptions {
            loss_targets: a.loss_targets.clone(),
            dice_target: a.dice_target,
            title: a.title.clone(),
        },
    )?;
    println!(
        "report of {} run(s): {} ({} files)",
        out.runs,
        a.out.join("index.html").display(),
        out.files.len()
    );
    Ok(())
}

/// `ctseg model`: the layer table of a config.
pub fn model(a: ModelArgs) -> Result<()> {
    let cfg = load_config(a.config.as_deref(), &a.overrides)?;
    let table = summarize_with_inputs(&cfg.model, cfg.data.in_channels());
    print!("{}", table.render(&cfg.model));
    Ok(())
}

/// `ctseg adapters`.
pub fn adapters() -> Result<()> {
    print!("{}", backend::describe_adapters(&backend::list_adapters()));
    Ok(())
}
