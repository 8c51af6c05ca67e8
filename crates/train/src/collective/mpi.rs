//! [`Collective`] over MPI (Open MPI or MPICH, through the `mpi` crate):
//! the ranks `mpirun -np N` or Slurm's `srun` starts.
//!
//! MPI is initialised at `MPI_THREAD_FUNNELED`: the compute threads never
//! call MPI, and every call is made by the thread that initialised it (the
//! one that runs the recipe), which [`Mpi`] checks.

use std::thread::ThreadId;

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;

use super::Collective;
use crate::error::{Error, Result};

/// The MPI world of this job.
pub struct Mpi {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    thread: ThreadId,
    /// Finalises MPI when dropped (last: after `world`).
    _universe: Universe,
}

impl Mpi {
    /// Joins the job's ranks (`MPI_Init_thread`).
    pub fn init() -> Result<Mpi> {
        let (universe, _level) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| Error::Collective("MPI was initialised already".into()))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Mpi { world, rank, size, thread: std::thread::current().id(), _universe: universe })
    }

    fn check_thread(&self) -> Result<()> {
        if std::thread::current().id() != self.thread {
            return Err(Error::Collective("MPI called from a thread other than the one that initialised it".into()));
        }
        Ok(())
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn engine(&self) -> &'static str {
        "mpi"
    }
    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<()> {
        self.check_thread()?;
        let send = data.to_vec();
        self.world.all_reduce_into(&send[..], data, SystemOperation::sum());
        Ok(())
    }
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()> {
        self.check_thread()?;
        let send = data.to_vec();
        self.world.all_reduce_into(&send[..], data, SystemOperation::sum());
        Ok(())
    }
    fn broadcast_bytes(&self, data: &mut Vec<u8>) -> Result<()> {
        self.check_thread()?;
        let root = self.world.process_at_rank(0);
        let mut len = data.len() as u64;
        root.broadcast_into(&mut len);
        data.resize(len as usize, 0);
        if len > 0 {
            root.broadcast_into(&mut data[..]);
        }
        Ok(())
    }
    /// `MPI_Abort`: ends every rank of the job.
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
