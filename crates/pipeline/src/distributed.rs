//! Which ranks of a data-parallel job this process is, read from the
//! launcher's own variables, and the engine that joins them.
//!
//! `mpirun -np N pipeline run R` (Open MPI: `OMPI_COMM_WORLD_SIZE`; MPICH's
//! Hydra: `PMI_SIZE`) or Slurm's `srun` (`SLURM_NTASKS` inside a job step)
//! starts N copies of the same command; each joins the MPI world (the `mpi`
//! feature). Every rank runs the stages the data-parallel ones read (a
//! shared cache computes each once), trains together, and only rank 0
//! writes checkpoints, publishes, prints progress and runs the stages after
//! training. Without a launcher this process is the only rank.

use std::rc::Rc;

use anyhow::{Result, bail};
use pipeline_train::{Collective, Single};

/// The launcher variables that say how many ranks were started, by launcher.
pub const LAUNCHER_VARIABLES: &[(&str, &str)] = &[
    ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
    ("PMI_SIZE", "MPICH's mpiexec (Hydra) or srun --mpi=pmi2"),
    ("SLURM_NTASKS", "Slurm's srun"),
];

/// torchrun's (and accelerate's) variables: CUDA ranks joined over NCCL.
const TORCHRUN: &str = "WORLD_SIZE";

/// The number of ranks the launcher started, and which variable said so.
pub fn launched_ranks() -> Option<(usize, &'static str, &'static str)> {
    launched_ranks_in(|name| std::env::var(name).ok())
}

/// [`launched_ranks`] with the environment read through `env`.
fn launched_ranks_in(env: impl Fn(&str) -> Option<String>) -> Option<(usize, &'static str, &'static str)> {
    for &(name, launcher) in LAUNCHER_VARIABLES {
        // srun sets SLURM_NTASKS in the whole allocation (an sbatch script
        // too): only a job step's processes are its ranks.
        if name == "SLURM_NTASKS" && env("SLURM_STEP_ID").is_none() {
            continue;
        }
        if let Some(n) = env(name).and_then(|v| v.trim().parse::<usize>().ok()) {
            return Some((n, name, launcher));
        }
    }
    None
}

/// This process's ranks: [`Single`] unless a launcher started several, then
/// the MPI world (or a clear error where this build cannot join it).
pub fn world() -> Result<Rc<dyn Collective>> {
    if let Some(n) = std::env::var(TORCHRUN).ok().and_then(|v| v.parse::<usize>().ok())
        && n > 1
        && launched_ranks().is_none()
    {
        bail!(
            "{TORCHRUN}={n}: started by torchrun, whose ranks join over NCCL on CUDA; this build joins ranks over MPI only. \
             Start the ranks with `mpirun -np {n} pipeline run …` (or srun) instead"
        );
    }
    match launched_ranks() {
        Some((n, _, _)) if n > 1 => join_mpi(n),
        _ => Ok(Rc::new(Single)),
    }
}

#[cfg(feature = "mpi")]
fn join_mpi(_n: usize) -> Result<Rc<dyn Collective>> {
    Ok(Rc::new(pipeline_train::collective::mpi::Mpi::init()?))
}

#[cfg(not(feature = "mpi"))]
fn join_mpi(n: usize) -> Result<Rc<dyn Collective>> {
    let (_, var, launcher) = launched_ranks().expect("called with ranks");
    bail!(
        "{launcher} started {n} ranks ({var}={n}), but this pipeline was built without MPI: \
         build it with `cargo build --release --features mpi` (scripts/install-mpi.sh installs Open MPI), \
         or run it without the launcher"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranks(vars: &[(&str, &str)]) -> Option<usize> {
        let env = |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
        launched_ranks_in(env).map(|(n, _, _)| n)
    }

    /// mpirun's and Hydra's variables are read; Slurm's count only inside a
    /// job step (srun), not in the batch script of an array task.
    #[test]
    fn the_launchers_own_variables_say_how_many_ranks() {
        assert_eq!(ranks(&[]), None);
        assert_eq!(ranks(&[("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_RANK", "1")]), Some(4));
        assert_eq!(ranks(&[("PMI_SIZE", "2")]), Some(2));
        assert_eq!(ranks(&[("SLURM_NTASKS", "8")]), None, "an sbatch script is not a rank");
        assert_eq!(ranks(&[("SLURM_NTASKS", "8"), ("SLURM_STEP_ID", "0")]), Some(8));
        assert_eq!(ranks(&[("SLURM_NTASKS", "1"), ("SLURM_STEP_ID", "0"), ("SLURM_ARRAY_TASK_ID", "3")]), Some(1));
    }
}
