//! Group commit for the SMS-CAS interface: request handlers hand their
//! parsed command to the [`Committer`] and wait for its outcome; a few
//! committer tasks take every command waiting at that moment (up to
//! `api.commit_batch`) and store them together with
//! [`store::accept_batch`], in one transaction per round.
//!
//! Why: a command alone is about ten statements and an fsync'd commit;
//! MariaDB then spends its time on statement overhead, not on the data.
//! Batched, the statement count per round is fixed and the commit is
//! shared, so throughput grows with load while a lone command still goes
//! straight through (nothing waits for a batch to fill: a committer that
//! is free takes whatever is there, even one command).
//!
//! `api.committers` tasks (default 2) take turns: one batch is built (its
//! reads and writes) while the one before waits for its fsync. A task
//! collects its batch only once the previous round has reached its COMMIT
//! (the `stage` lock), so everything that arrived meanwhile goes into one
//! round: starting a second round at once would split the waiting
//! commands into small rounds that only contend for the same rows. A turn
//! lasts at most [`BUILD_TURN_MAX`]: a round held up by a lock taken
//! elsewhere lets the next one build meanwhile. The queue is bounded
//! (16 batches): past it a command is refused at once with 503 and
//! `Retry-After` (nothing stored), instead of waiting without limit.
//!
//! The committers run on a thread of their own: on the request runtime,
//! each of a round's database round trips waited behind every HTTP task
//! ready at that moment (several milliseconds under load), and the round
//! is the path every command goes through.
//!
//! A handler whose client goes away does not withdraw its command: once
//! queued it is committed (the SMS, retrying with the same transaction_id,
//! gets the stored reply). The tasks end when every handle is dropped and
//! the queue is empty, so a graceful stop answers every queued command.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex};

use super::error::SmsError;
use super::store::{self, Accepted, Submission};
use crate::db::Db;

/// How long a round may keep the other committers from building theirs:
/// above a normal round (a few ms at tens of commands, up to about 40 ms
/// for a full batch of 256 on a 2-core machine; at 20 ms, rounds under
/// load overlapped and each command cost a third more CPU), short enough
/// that a round stuck on a lock does not hold up the rest for long.
pub const BUILD_TURN_MAX: std::time::Duration = std::time::Duration::from_millis(100);

struct Job {
    sub: Submission,
    done: oneshot::Sender<Result<Accepted, SmsError>>,
}

/// Handle to the committer tasks (cheap to clone).
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
}

impl Committer {
    /// Starts `committers` tasks taking up to `batch` commands per round,
    /// on a thread of their own (`casd-commit`) with its own single-thread
    /// runtime and its own database connections. The thread ends when
    /// every handle is dropped and the queue is empty.
    pub fn start(db: Db, batch: usize, committers: usize) -> Committer {
        Self::start_observed(db, batch, committers, metrics::Histogram::noop())
    }

    /// [`Committer::start`], recording each round's size in `round_size`.
    pub fn start_observed(
        db: Db,
        batch: usize,
        committers: usize,
        round_size: metrics::Histogram,
    ) -> Committer {
        let batch = batch.max(1);
        let (tx, rx) = mpsc::channel::<Job>(batch * 16);
        let rx = Arc::new(Mutex::new(rx));
        let spawned = std::thread::Builder::new()
            .name("casd-commit".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        // Every submit then fails with 500 (queue closed).
                        tracing::error!("cannot start the SMS committer runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut set = tokio::task::JoinSet::new();
                    // Shared by the committers: they take slots of the
                    // same table.
                    let hint = Arc::new(store::SlotHint::default());
                    let stage = Arc::new(Mutex::new(()));
                    for _ in 0..committers.max(1) {
                        set.spawn(run(
                            db.clone(),
                            rx.clone(),
                            batch,
                            hint.clone(),
                            stage.clone(),
                            round_size.clone(),
                        ));
                    }
                    while set.join_next().await.is_some() {}
                });
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the SMS committer thread: {e}");
        }
        Committer { tx }
    }

    /// Reads how many commands wait in the queue, without keeping the
    /// committer alive (for a metrics scrape).
    pub fn waiting(&self) -> impl Fn() -> usize + Send + Sync + 'static {
        let tx = self.tx.downgrade();
        move || {
            tx.upgrade()
                .map_or(0, |tx| tx.max_capacity() - tx.capacity())
        }
    }

    /// Stores `sub` (with whatever else is waiting) and returns its
    /// outcome once its round has committed or failed.
    pub async fn submit(&self, sub: Submission) -> Result<Accepted, SmsError> {
        let (done, wait) = oneshot::channel();
        self.tx.try_send(Job { sub, done }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SmsError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => {
                SmsError::Internal("the committer has stopped".into())
            }
        })?;
        wait.await
            .unwrap_or_else(|_| Err(SmsError::Internal("the committer dropped a command".into())))
    }
}

async fn run(
    db: Db,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    batch: usize,
    hint: Arc<store::SlotHint>,
    stage: Arc<Mutex<()>>,
    round_size: metrics::Histogram,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(batch);
    // The task's own connection, kept between batches; dropped after a
    // failed batch (it may be the connection that failed) and taken anew.
    let mut own: Option<mysql_async::Conn> = None;
    let hint = hint.as_ref();
    loop {
        // One task at a time collects and builds its round; the other is
        // at its COMMIT (or idle). Held until this round's COMMIT, or for
        // at most BUILD_TURN_MAX: a round waiting on a row lock held
        // elsewhere (another process, the EMMG's share lock during key
        // delivery) or on a slow connect must not stall every command
        // behind it.
        let building = std::sync::Mutex::new(Some(stage.clone().lock_owned().await));
        let end_turn = || {
            if let Ok(mut b) = building.lock() {
                b.take();
            }
        };
        {
            let mut rx = rx.lock().await;
            if rx.recv_many(&mut jobs, batch).await == 0 {
                return; // every handle dropped and nothing queued
            }
        }
        round_size.record(jobs.len() as f64);
        let (subs, dones): (Vec<Submission>, Vec<_>) =
            jobs.drain(..).map(|j| (j.sub, j.done)).unzip();
        let work = async {
            let conn = match own.take() {
                Some(c) => Ok(c),
                None => db.connect_own().await,
            };
            match conn {
                Ok(mut c) => {
                    let outcomes =
                        store::accept_batch_gated(&mut c, &subs, hint, &mut || end_turn()).await;
                    if !outcomes
                        .iter()
                        .any(|o| matches!(o, Err(SmsError::Db(_) | SmsError::Internal(_))))
                    {
                        own = Some(c);
                    }
                    outcomes
                }
                Err(e) => {
                    let e = SmsError::Db(e);
                    subs.iter().map(|_| Err(store::shared_error(&e))).collect()
                }
            }
        };
        tokio::pin!(work);
        let outcomes = tokio::select! {
            o = &mut work => o,
            _ = tokio::time::sleep(BUILD_TURN_MAX) => {
                end_turn();
                work.await
            }
        };
        end_turn();
        for (done, outcome) in dones.into_iter().zip(outcomes) {
            // The handler may have gone (client disconnected): the command
            // is stored all the same.
            let _ = done.send(outcome);
        }
    }
}
