//! The executor: builds the stage DAG, plans (which stages are cached, which
//! run and why), and runs the stages that must, publishing each atomically.
//!
//! Keys are computed in topological order: a stage's key needs the keys of
//! its inputs (not their outputs), so the whole plan is known before anything
//! runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;

use crate::error::{RecipeError, did_you_mean};
use crate::recipe::Recipe;
use crate::stages::{Env, RunContext};
use pipeline_cache::store::KeyLock;
use pipeline_cache::store::MANIFEST_FORMAT;
use pipeline_cache::{CacheKey, Fingerprint, HashMemo, Manifest, Remote, Store};
use pipeline_train::{Collective, Single};

/// What will happen to a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// A finished entry exists: reused.
    Cached,
    /// Runs from scratch.
    Run,
    /// Continues from a checkpoint in its work dir.
    Resume,
}

/// The plan for one stage.
#[derive(Debug, Clone, Serialize)]
pub struct StagePlan {
    pub name: String,
    pub kind: String,
    pub key: CacheKey,
    pub status: Status,
    /// For `run`/`resume`: why (what changed, or "no cache entry").
    pub reason: Option<String>,
    /// For `resume`: the step it continues from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    #[serde(skip)]
    pub fingerprint: Fingerprint,
    /// Parameter name → stage name of each input.
    #[serde(skip)]
    pub inputs: Vec<(String, String)>,
}

/// The outcome of [`Executor::claim`].
pub enum Claim {
    /// Held until dropped.
    Ours(ClaimGuard),
    /// Who holds it.
    Theirs(String),
}

/// A claim this process holds; released on drop.
pub struct ClaimGuard {
    _local: KeyLock,
    _remote: Option<pipeline_cache::remote::RemoteClaim>,
}

/// The plan for a recipe, in execution order.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub stages: Vec<StagePlan>,
}

impl Plan {
    pub fn stage(&self, name: &str) -> Option<&StagePlan> {
        self.stages.iter().find(|s| s.name == name)
    }
}

/// Whether a stage has a finished entry.
#[derive(Debug, Clone)]
pub enum Finished {
    /// Its directory in the local store.
    Entry(PathBuf),
    /// Not finished for this recipe and cache: why (what changed).
    NotYet(String),
}

/// What [`Executor::gc`] removed (or would remove) and kept.
#[derive(Debug, Clone, Default)]
pub struct Collected {
    pub removed: Vec<PathBuf>,
    pub kept: usize,
    /// Entries a running process holds.
    pub busy: usize,
}

/// Where a command's cache lives: `--cache-dir` (a directory, or an
/// object-store URL) and, for a URL, the local working copy.
#[derive(Debug, Clone)]
pub struct CacheLocation {
    pub cache_dir: String,
    pub local_cache: PathBuf,
}

impl Default for CacheLocation {
    /// `.pipeline` in the current directory.
    fn default() -> Self {
        CacheLocation::local(Path::new(".pipeline"))
    }
}

impl CacheLocation {
    /// A plain local cache directory.
    pub fn local(dir: &Path) -> CacheLocation {
        CacheLocation { cache_dir: dir.to_string_lossy().into_owned(), local_cache: dir.to_path_buf() }
    }

    /// The executor over this cache (connecting to the remote one, if any).
    pub fn open(&self) -> Result<Executor> {
        if pipeline_cache::remote::is_url(&self.cache_dir) {
            Executor::with_remote(&self.local_cache, Remote::open(&self.cache_dir)?)
        } else {
            Executor::new(Path::new(&self.cache_dir))
        }
    }
}

/// Runs recipes against one cache directory, optionally backed by a remote
/// cache in an object store.
pub struct Executor {
    store: Store,
    memo: HashMemo,
    remote: Option<Remote>,
    /// The ranks of a data-parallel job ([`Single`]: one process).
    world: Rc<dyn Collective>,
}

impl Executor {
    /// An executor over the cache at `cache_dir` (created if needed).
    pub fn new(cache_dir: &Path) -> Result<Executor> {
        let store = Store::open(cache_dir)?;
        let memo = HashMemo::open(cache_dir.join("hashes.json"));
        Ok(Executor { store, memo, remote: None, world: Rc::new(Single) })
    }

    /// Runs as one rank of `world` (see [`crate::distributed`]): every rank
    /// runs the data-parallel stages together and, first, the stages they
    /// read; rank 0 alone publishes those and runs the rest.
    pub fn with_world(mut self, world: Rc<dyn Collective>) -> Executor {
        self.world = world;
        self
    }

    /// An executor whose local cache at `cache_dir` is backed by `remote`:
    /// finished entries are pulled from it and pushed to it, and training
    /// checkpoints are synced to it.
    pub fn with_remote(cache_dir: &Path, remote: Remote) -> Result<Executor> {
        remote.check_readable()?;
        let mut e = Executor::new(cache_dir)?;
        e.remote = Some(remote);
        Ok(e)
    }

    /// Claims `name` (a sweep variant, see [`crate::sweep::claim_name`]) for
    /// this process: a lock file in the local cache, which the OS drops if
    /// the process dies, and with a remote cache a create-only claim object
    /// the process refreshes (taken over once stale). `Theirs` says who holds
    /// it.
    pub fn claim(&self, name: &str) -> Result<Claim> {
        let Some(local) = self.store.try_lock(&CacheKey(name.to_string()))? else {
            return Ok(Claim::Theirs("another process using this cache directory".into()));
        };
        let remote = match &self.remote {
            None => None,
            Some(r) => match r.claim(name)? {
                pipeline_cache::remote::Claimed::Ours(c) => Some(c),
                pipeline_cache::remote::Claimed::Theirs(holder) => {
                    return Ok(Claim::Theirs(format!("{holder}, through {}", r.url())));
                }
            },
        };
        Ok(Claim::Ours(ClaimGuard { _local: local, _remote: remote }))
    }

    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_ref()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Computes every stage's key and status, up to `until` (and what it
    /// needs) when given.
    pub fn plan(&self, recipe: &Recipe, until: Option<&str>) -> Result<Plan> {
        let env = Env::new(recipe.settings(), &self.memo);
        let plan = self.plan_with(recipe, &env, until)?;
        self.memo.save().ok();
        Ok(plan)
    }

    fn plan_with(&self, recipe: &Recipe, env: &Env, until: Option<&str>) -> Result<Plan> {
        let order = execution_order(recipe, until)?;
        let mut keys: BTreeMap<String, CacheKey> = BTreeMap::new();
        let mut stages = Vec::new();
        for name in order {
            let spec = &recipe.stages[&name];
            let stage = spec.stage();
            let mut params = stage.params(env);
            let mut inputs = BTreeMap::new();
            let mut input_names = Vec::new();
            for input in spec.inputs() {
                // References are labels: the input's key stands in for them.
                if let Some(obj) = params.as_object_mut() {
                    obj.remove(input.role);
                }
                inputs.insert(input.role.to_string(), keys[input.stage].clone());
                input_names.push((input.role.to_string(), input.stage.to_string()));
            }
            let outside = stage
                .outside_inputs(env)
                .with_context(|| format!("stage `{name}` ({}): cannot read its inputs", spec.kind()))?;
            let fingerprint =
                Fingerprint { kind: spec.kind().to_string(), version: stage.version(), params, inputs, outside };
            let key = fingerprint.key();
            // A remote that cannot be asked is an error, never "not there": a
            // stage planned as new while its checkpoint is out of reach would
            // start over and, once published, replace nothing but lose hours.
            let unreachable = |what: &str| {
                format!(
                    "stage `{name}`: cannot ask the remote cache whether {what}; nothing was run (retry once the store answers)"
                )
            };
            let (status, reason, step) = if self.store.is_finished(&key) {
                (Status::Cached, None, None)
            } else if let Some(remote) = &self.remote
                && remote.has_entry(&key).with_context(|| unreachable("it is finished"))?
            {
                (Status::Cached, Some(format!("in the remote cache {}", remote.url())), None)
            } else {
                let reason = self.why(&recipe.ref_name(), &name, &key, &fingerprint);
                let local = stage.resume_point(&self.store.work_dir(&key));
                let remote = match (&local, &self.remote) {
                    (None, Some(r)) if stage.resumable() => {
                        r.latest_checkpoint(&key).with_context(|| unreachable("it has a checkpoint"))?
                    }
                    _ => None,
                };
                match (local, remote) {
                    (Some(step), _) => (Status::Resume, Some(reason), Some(step)),
                    (None, Some(step)) => {
                        (Status::Resume, Some(format!("{reason}; checkpoint in the remote cache")), Some(step))
                    }
                    (None, None) => (Status::Run, Some(reason), None),
                }
            };
            keys.insert(name.clone(), key.clone());
            stages.push(StagePlan {
                name,
                kind: spec.kind().to_string(),
                key,
                status,
                reason,
                step,
                fingerprint,
                inputs: input_names,
            });
        }
        Ok(Plan { stages })
    }

    /// Why a stage has no cache entry: the differences from what it last
    /// resolved to in this recipe, or "no cache entry".
    fn why(&self, recipe: &str, stage: &str, key: &CacheKey, fp: &Fingerprint) -> String {
        match self.store.get_ref(recipe, stage) {
            Some(old) if old != *key => match self.store.fingerprint(&old) {
                Some(old_fp) => {
                    let diff = fp.diff(&old_fp);
                    if diff.is_empty() { "no cache entry".into() } else { diff.join("; ") }
                }
                None => "no cache entry".into(),
            },
            Some(_) => "no cache entry (the previous result was removed or never finished)".into(),
            None => "no cache entry".into(),
        }
    }

    /// Runs the recipe (up to `until`): reuses cached stages, runs the rest
    /// in order, publishing each as it finishes.
    pub fn run(&self, recipe: &Recipe, until: Option<&str>) -> Result<Vec<StageOutcome>> {
        if let Some(remote) = &self.remote {
            remote.check_writable()?;
        }
        let env = Env::new(recipe.settings(), &self.memo);
        let mut plan = self.plan_with(recipe, &env, until)?;
        self.memo.save().ok();
        if self.world.size() > 1 {
            self.order_for_ranks(recipe, &mut plan);
        }
        let mut dirs: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut outcomes = Vec::new();
        // Finished only in the remote cache and read by no stage that runs
        // (yet): left there. Pulled when a stage that runs needs them, and
        // the stages nothing else reads (the recipe's results) always.
        let mut remote_only: BTreeMap<&str, &StagePlan> = BTreeMap::new();
        let read_by_others: BTreeSet<&str> =
            plan.stages.iter().flat_map(|s| s.inputs.iter().map(|(_, stage)| stage.as_str())).collect();
        for sp in &plan.stages {
            let started = Instant::now();
            let done = if self.world.size() > 1 && recipe.stages[&sp.name].stage().data_parallel() {
                self.pull_inputs(sp, &mut remote_only)?;
                match self.world.rank() {
                    0 => self.run_stage(recipe, &env, sp, &dirs, true)?,
                    _ => self.join_stage(recipe, &env, sp, &dirs)?,
                }
            } else {
                let local = self.store.is_finished(&sp.key);
                let remote_finished = match &self.remote {
                    Some(r) if !local => r.has_entry(&sp.key).with_context(|| {
                        format!("stage `{}`: cannot ask the remote cache whether it is finished", sp.name)
                    })?,
                    _ => false,
                };
                if remote_finished && read_by_others.contains(sp.name.as_str()) {
                    remote_only.insert(&sp.name, sp);
                    Done::Remote
                } else {
                    // Only a stage that runs reads its inputs.
                    if !(local || remote_finished) {
                        self.pull_inputs(sp, &mut remote_only)?;
                    }
                    self.run_stage(recipe, &env, sp, &dirs, false)?
                }
            };
            let elapsed = started.elapsed().as_secs_f64();
            // A rank other than 0 published nothing: no entry to point at.
            if done != Done::Joined {
                self.store.set_ref(&recipe.ref_name(), &sp.name, &sp.key)?;
            }
            self.report(done, sp, elapsed);
            dirs.insert(sp.name.clone(), self.store.entry_dir(&sp.key));
            outcomes.push(StageOutcome { name: sp.name.clone(), key: sp.key.clone(), done, seconds: elapsed });
        }
        if let Some(remote) = &self.remote {
            // What jobs killed mid-upload left under this recipe's entries.
            let keys: Vec<CacheKey> = plan.stages.iter().map(|s| s.key.clone()).collect();
            let swept = remote.sweep_uploads(Some(&keys), pipeline_cache::remote::UPLOAD_IDLE, false)?;
            if !swept.uploads.is_empty() {
                crate::report::println(&format!(
                    "  removed {} abandoned upload{} ({:.1} MB) from {}",
                    swept.uploads.len(),
                    if swept.uploads.len() == 1 { "" } else { "s" },
                    swept.bytes as f64 / 1e6,
                    remote.url()
                ));
            }
        }
        Ok(outcomes)
    }

    /// The status line of one stage.
    fn report(&self, done: Done, sp: &StagePlan, seconds: f64) {
        crate::report::println(&format!(
            "  {:<7} {:<16} {:<16} {}  {seconds:.2}s",
            done.verb(),
            sp.name,
            sp.kind,
            sp.key.short()
        ));
    }

    /// Copies from the remote cache the inputs of `sp` that are finished
    /// only there (a stage about to run reads them).
    fn pull_inputs<'p>(&self, sp: &StagePlan, remote_only: &mut BTreeMap<&'p str, &'p StagePlan>) -> Result<()> {
        for (_, input) in &sp.inputs {
            if let Some(isp) = remote_only.remove(input.as_str()) {
                let t0 = Instant::now();
                self.pull_one(isp)?;
                self.report(Done::Pulled, isp, t0.elapsed().as_secs_f64());
            }
        }
        Ok(())
    }

    /// With several ranks: the data-parallel stages and the stages they read
    /// go first (the other ranks wait for rank 0 in the first collective
    /// call, so nothing else should come before), in an order that is still
    /// the plan's; the other ranks run only those.
    fn order_for_ranks(&self, recipe: &Recipe, plan: &mut Plan) {
        let mut shared: BTreeSet<String> = BTreeSet::new();
        for sp in plan.stages.iter().rev() {
            if shared.contains(&sp.name) || recipe.stages[&sp.name].stage().data_parallel() {
                shared.insert(sp.name.clone());
                shared.extend(sp.inputs.iter().map(|(_, stage)| stage.clone()));
            }
        }
        let (first, rest): (Vec<StagePlan>, Vec<StagePlan>) =
            std::mem::take(&mut plan.stages).into_iter().partition(|sp| shared.contains(&sp.name));
        plan.stages = first;
        if self.world.rank() == 0 {
            plan.stages.extend(rest);
        }
    }

    /// Runs one stage unless it is (or, after waiting for a lock, has become)
    /// cached, locally or in the remote cache. With `shared` (a data-parallel
    /// stage of a job of several ranks, on rank 0) the other ranks are told
    /// whether it runs, and then run it with this one ([`Self::join_stage`]).
    fn run_stage(
        &self,
        recipe: &Recipe,
        env: &Env,
        sp: &StagePlan,
        dirs: &BTreeMap<String, PathBuf>,
        shared: bool,
    ) -> Result<Done> {
        let announce = |runs: bool| -> Result<()> {
            if shared {
                self.world.broadcast_bytes(&mut vec![u8::from(runs)])?;
            }
            Ok(())
        };
        if self.store.is_finished(&sp.key) {
            announce(false)?;
            self.push(sp)?;
            return Ok(Done::Cached);
        }
        let lock = self.store.lock(&sp.key, || {
            crate::report::println(&format!("  waiting for another pipeline process working on `{}`", sp.name))
        })?;
        if self.store.is_finished(&sp.key) {
            announce(false)?;
            self.push(sp)?;
            return Ok(Done::Cached);
        }
        let work = self.store.prepare_work(&sp.key, &sp.fingerprint, &lock)?;
        if let Some(remote) = &self.remote {
            // Another machine may have finished it since the plan was made.
            if self.pull_into(sp, remote, &work, &lock)? {
                announce(false)?;
                return Ok(Done::Pulled);
            }
        }
        // Held until the entry is published and pushed: a job on another
        // machine needing the same stage waits for it instead of computing it.
        let _claim = match &self.remote {
            Some(remote) => match self.claim_stage(sp, remote, &work, &lock)? {
                Some(claim) => Some(claim),
                None => {
                    announce(false)?;
                    return Ok(Done::Pulled);
                }
            },
            None => None,
        };
        if let Some(remote) = &self.remote {
            // The decision to resume is taken again, from the remote, now:
            // a checkpoint may have appeared (or been out of reach) since the
            // plan was made.
            let stage = recipe.stages[&sp.name].stage();
            if stage.resumable() && stage.resume_point(&work).is_none() {
                let step = remote.pull_latest_checkpoint(&sp.key, &pipeline_train::checkpoint::dir(&work))?;
                if let Some(step) = step {
                    tracing::info!(stage = %sp.name, step, "pulled the newest checkpoint from the remote cache");
                    crate::report::println(&format!(
                        "  resuming {} from step {step} (checkpoint in {})",
                        sp.name,
                        remote.url()
                    ));
                }
            }
        }
        match (&sp.status, &sp.reason) {
            (Status::Resume, _) => tracing::info!(stage = %sp.name, step = sp.step, "resuming"),
            (_, Some(reason)) => tracing::info!(stage = %sp.name, %reason, "running"),
            _ => {}
        }
        let spec = &recipe.stages[&sp.name];
        let ctx = RunContext {
            name: &sp.name,
            key: &sp.key,
            out: work.join("out"),
            work: work.clone(),
            inputs: sp.inputs.iter().map(|(role, stage)| (role.clone(), dirs[stage].clone())).collect(),
            env,
            remote: self.remote.as_ref(),
            world: self.world.clone(),
        };
        announce(true)?;
        let started_at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let t0 = Instant::now();
        let metrics = spec.stage().run(&ctx).with_context(|| format!("stage `{}` ({}) failed", sp.name, sp.kind));
        // The stage's tensors are gone: give their memory back before the next one.
        crate::allocator::release();
        let metrics = metrics?;
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            key: sp.key.clone(),
            kind: sp.kind.clone(),
            fingerprint: sp.fingerprint.clone(),
            files: vec![],
            started_at,
            duration_s: t0.elapsed().as_secs_f64(),
            pipeline_version: env!("CARGO_PKG_VERSION").to_string(),
            metrics,
        };
        self.store.publish(&sp.key, manifest, &lock)?;
        drop(lock);
        self.push(sp)?;
        if let Some(remote) = &self.remote {
            remote.drop_checkpoints(&sp.key)?;
        }
        Ok(Done::Ran)
    }

    /// Claims the stage in the remote cache (`claims/stage-<key>.json`), as
    /// sweeps claim variants. While another live job holds it, waits for
    /// that job's entry and pulls it: `None`. A holder that died lets its
    /// claim go stale, and this job takes it over (and resumes from the
    /// checkpoints it pushed).
    fn claim_stage(
        &self,
        sp: &StagePlan,
        remote: &Remote,
        work: &Path,
        lock: &KeyLock,
    ) -> Result<Option<pipeline_cache::remote::RemoteClaim>> {
        let mut said = false;
        let mut pause = std::time::Duration::from_millis(500);
        loop {
            match remote.claim(&format!("stage-{}", sp.key.0))? {
                pipeline_cache::remote::Claimed::Ours(claim) => return Ok(Some(claim)),
                pipeline_cache::remote::Claimed::Theirs(holder) => {
                    if !said {
                        crate::report::println(&format!(
                            "  waiting for {holder} working on `{}`, through {}",
                            sp.name,
                            remote.url()
                        ));
                        said = true;
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_secs(5));
                    if self.pull_into(sp, remote, work, lock)? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// A data-parallel stage on a rank other than 0: runs it with rank 0 when
    /// rank 0 says it runs, in a scratch directory (rank 0 publishes).
    fn join_stage(&self, recipe: &Recipe, env: &Env, sp: &StagePlan, dirs: &BTreeMap<String, PathBuf>) -> Result<Done> {
        let mut runs = vec![];
        self.world.broadcast_bytes(&mut runs)?;
        if runs != [1] {
            return Ok(Done::Cached);
        }
        let scratch = self.store.root().join("tmp").join(format!("rank-{}-{}", self.world.rank(), sp.key.short()));
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch).with_context(|| format!("cannot clear {}", scratch.display()))?;
        }
        std::fs::create_dir_all(scratch.join("out")).with_context(|| format!("cannot create {}", scratch.display()))?;
        let ctx = RunContext {
            name: &sp.name,
            key: &sp.key,
            out: scratch.join("out"),
            work: scratch.clone(),
            inputs: sp.inputs.iter().map(|(role, stage)| (role.clone(), dirs[stage].clone())).collect(),
            env,
            remote: None,
            world: self.world.clone(),
        };
        let result = recipe.stages[&sp.name].stage().run(&ctx);
        crate::allocator::release();
        result.with_context(|| format!("stage `{}` ({}) failed on rank {}", sp.name, sp.kind, self.world.rank()))?;
        std::fs::remove_dir_all(&scratch).ok();
        Ok(Done::Joined)
    }

    /// Copies into the local cache the stages of `recipe` (only `stage`, when
    /// given) that are finished only in the remote cache, for `export`,
    /// `show` and `generate --recipe`. Returns how many.
    pub fn pull_finished(&self, recipe: &Recipe, stage: Option<&str>) -> Result<usize> {
        if self.remote.is_none() {
            return Ok(0);
        }
        let mut n = 0;
        for sp in self.plan(recipe, stage)?.stages {
            if stage.is_some_and(|s| s != sp.name) || sp.status != Status::Cached || self.store.is_finished(&sp.key) {
                continue;
            }
            self.pull_one(&sp)?;
            n += 1;
        }
        Ok(n)
    }

    /// The finished entry of `stage` for `recipe` (pulled from the remote
    /// cache if only it has one), or why there is none.
    pub fn finished(&self, recipe: &Recipe, stage: &str) -> Result<Finished> {
        if !recipe.stages.contains_key(stage) {
            let e = RecipeError::new(format!("no stage named `{stage}`")).in_file(&recipe.path);
            return Err(match did_you_mean(stage, recipe.stages.keys().map(String::as_str)) {
                Some(s) => e.help(format!("did you mean `{s}`?")),
                None => e,
            }
            .into());
        }
        self.pull_finished(recipe, Some(stage))?;
        let plan = self.plan(recipe, Some(stage))?;
        let sp = plan.stage(stage).expect("planned");
        Ok(if sp.status == Status::Cached && self.store.is_finished(&sp.key) {
            Finished::Entry(self.store.entry_dir(&sp.key))
        } else {
            Finished::NotYet(sp.reason.clone().unwrap_or_else(|| "not run".into()))
        })
    }

    /// Removes the local entries (finished and unfinished) that none of
    /// `keep` would use, skipping those another process holds; with
    /// `dry_run` only says what it would remove. Entries in a remote cache
    /// are never deleted here.
    pub fn gc(&self, keep: &[Recipe], dry_run: bool) -> Result<Collected> {
        let mut used = std::collections::BTreeSet::new();
        for recipe in keep {
            let plan = self.plan(recipe, None).with_context(|| format!("cannot plan {}", recipe.path.display()))?;
            used.extend(plan.stages.into_iter().map(|s| s.key));
        }
        let store = &self.store;
        let mut out = Collected::default();
        let entries = store.entries()?.into_iter().map(|k| (store.entry_dir(&k), k));
        let works = store.work_entries()?.into_iter().map(|k| (store.work_dir(&k), k));
        for (dir, key) in entries.chain(works) {
            if used.contains(&key) {
                out.kept += 1;
                continue;
            }
            // Never remove what a running process is writing.
            let Some(_lock) = store.try_lock(&key)? else {
                out.busy += 1;
                continue;
            };
            if !dry_run {
                store.remove(&dir)?;
            }
            out.removed.push(dir);
        }
        store.empty_trash()?;
        Ok(out)
    }

    /// Copies one entry the plan found in the remote cache into the local one.
    fn pull_one(&self, sp: &StagePlan) -> Result<()> {
        let remote = self.remote.as_ref().expect("a remote cache");
        let lock = self.store.lock(&sp.key, || {})?;
        if self.store.is_finished(&sp.key) {
            return Ok(());
        }
        let work = self.store.prepare_work(&sp.key, &sp.fingerprint, &lock)?;
        if !self.pull_into(sp, remote, &work, &lock)? {
            bail!("stage `{}`: its entry vanished from {}", sp.name, remote.url());
        }
        Ok(())
    }

    /// Downloads the remote entry of `sp` into `work/out` and publishes it
    /// locally; false when the remote has no such entry.
    fn pull_into(&self, sp: &StagePlan, remote: &Remote, work: &Path, lock: &KeyLock) -> Result<bool> {
        let pulled = remote
            .pull_entry(&sp.key, &work.join("out"))
            .with_context(|| format!("stage `{}`: cannot pull its entry from {}", sp.name, remote.url()))?;
        match pulled {
            Some(manifest) => {
                self.store.publish(&sp.key, manifest, lock)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Uploads the finished local entry to the remote cache unless it is
    /// there already.
    fn push(&self, sp: &StagePlan) -> Result<()> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let manifest = self.store.manifest(&sp.key)?.context("a finished entry without manifest")?;
        if remote
            .push_entry(&sp.key, &self.store.entry_dir(&sp.key), &manifest)
            .with_context(|| format!("stage `{}`: cannot push its entry to {}", sp.name, remote.url()))?
        {
            tracing::info!(stage = %sp.name, remote = remote.url(), "pushed");
        }
        Ok(())
    }
}

/// How a stage came to be finished in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Done {
    Ran,
    Cached,
    /// Copied from the remote cache.
    Pulled,
    /// Finished in the remote cache and not needed here.
    Remote,
    /// A data-parallel stage this rank (not rank 0) trained its share of;
    /// rank 0 published it.
    Joined,
}

impl Done {
    /// The word `run` prints.
    pub fn verb(self) -> &'static str {
        match self {
            Done::Ran => "ran",
            Done::Cached => "cached",
            Done::Pulled => "pulled",
            Done::Remote => "remote",
            Done::Joined => "joined",
        }
    }
}

/// What happened to one stage in a run.
#[derive(Debug, Clone, Serialize)]
pub struct StageOutcome {
    pub name: String,
    pub key: CacheKey,
    pub done: Done,
    pub seconds: f64,
}

impl StageOutcome {
    /// Whether the stage ran here (rather than being reused).
    pub fn ran(&self) -> bool {
        self.done == Done::Ran
    }
}

/// The stages in a valid execution order (inputs first), restricted to
/// `until` and its ancestors. Cycles and unknown `until` names are recipe
/// errors; so are references to a stage of the wrong kind.
pub fn execution_order(recipe: &Recipe, until: Option<&str>) -> Result<Vec<String>, RecipeError> {
    let mut graph: DiGraph<&str, ()> = DiGraph::new();
    let nodes: BTreeMap<&str, NodeIndex> =
        recipe.stages.keys().map(|name| (name.as_str(), graph.add_node(name.as_str()))).collect();
    for (name, spec) in &recipe.stages {
        for input in spec.inputs() {
            graph.add_edge(nodes[input.stage], nodes[name.as_str()], ());
        }
    }
    let sorted = toposort(&graph, None).map_err(|cycle| {
        let scc = tarjan_scc(&graph).into_iter().find(|c| c.contains(&cycle.node_id())).unwrap_or_default();
        let mut names: Vec<&str> = scc.iter().map(|n| graph[*n]).collect();
        names.sort();
        let first = names.first().copied().unwrap_or(graph[cycle.node_id()]);
        let path = cycle_path(recipe, first);
        RecipeError::new(format!("the stages form a cycle: {}", path.join(" → ")))
            .at(recipe.locate(&["stages", first]))
            .in_file(&recipe.path)
            .key(format!("stages.{first}"))
            .help("a stage cannot read its own output, directly or through others; fix the references")
    })?;
    recipe.check_input_kinds(std::fs::read_to_string(&recipe.path).ok().as_deref())?;

    let keep: Option<std::collections::BTreeSet<NodeIndex>> = match until {
        None => None,
        Some(u) => {
            let Some(&target) = nodes.get(u) else {
                let mut e = RecipeError::new(format!("--until `{u}`: no stage has that name")).in_file(&recipe.path);
                e.help = Some(match did_you_mean(u, nodes.keys().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("stages: {}", nodes.keys().copied().collect::<Vec<_>>().join(", ")),
                });
                return Err(e);
            };
            let mut rev = graph.clone();
            rev.reverse();
            let mut dfs = petgraph::visit::Dfs::new(&rev, target);
            let mut set = std::collections::BTreeSet::new();
            while let Some(n) = dfs.next(&rev) {
                set.insert(n);
            }
            Some(set)
        }
    };
    Ok(sorted
        .into_iter()
        .filter(|n| keep.as_ref().is_none_or(|k| k.contains(n)))
        .map(|n| graph[n].to_string())
        .collect())
}

/// Follows references from `start` back to itself, for the cycle message.
fn cycle_path(recipe: &Recipe, start: &str) -> Vec<String> {
    let mut path = vec![start.to_string()];
    let mut cur = start.to_string();
    for _ in 0..recipe.stages.len() {
        let Some(next) = recipe.stages[&cur].inputs().first().map(|i| i.stage.to_string()) else {
            break;
        };
        path.push(next.clone());
        if next == start {
            break;
        }
        cur = next;
    }
    path
}
