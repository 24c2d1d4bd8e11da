//! Queries embedded together. Each request decodes and preprocesses its own image on the
//! blocking pool, then hands the tensor here; the batcher runs the model on up to `max_batch`
//! tensors at once: those waiting when a model session frees up, and those that arrive within
//! `window` of the first while other queries are still being preprocessed (a lone query does not
//! wait). One call over several images costs less than as many calls, above all on a GPU.
//! `max_batch` 1 turns it off.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::embed::{Model, ModelError};

type Reply = oneshot::Sender<Result<Vec<f32>, ModelError>>;

/// A preprocessed image, where its vector goes, and what the request holds until the model has
/// run (its embed slot): released then, even if the request is gone.
type Job = (Vec<f32>, Reply, Box<dyn Send>);

#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
}

impl Batcher {
    /// `in_flight` counts the queries on their way (preprocessing, waiting here, or in the model);
    /// `on_batch` is told each batch's size (for the metrics).
    pub fn new(
        model: Arc<Model>,
        max_batch: usize,
        window: Duration,
        in_flight: impl Fn() -> usize + Send + 'static,
        on_batch: impl Fn(usize) + Send + 'static,
    ) -> Self {
        // The requests' own bound (the embed slots) keeps this from growing; the channel's is a backstop.
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(run(model, rx, Gather { max_batch: max_batch.max(1), window, in_flight }, on_batch));
        Self { tx }
    }

    /// The L2-normalised vector of one image prepared for the model (`Model::preprocess`).
    pub async fn embed(&self, tensor: Vec<f32>, held: impl Send + 'static) -> Result<Vec<f32>, ModelError> {
        let (reply, answer) = oneshot::channel();
        let gone = || ModelError::Setup("the model's batcher stopped".into());
        self.tx.send((tensor, reply, Box::new(held))).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

struct Gather<F> {
    max_batch: usize,
    window: Duration,
    in_flight: F,
}

async fn run(
    model: Arc<Model>,
    mut rx: mpsc::Receiver<Job>,
    gather: Gather<impl Fn() -> usize>,
    on_batch: impl Fn(usize),
) {
    let Gather { max_batch, window, in_flight } = gather;
    // As many batches in flight as the model has sessions: the next batch gathers while they run.
    let sessions = Arc::new(Semaphore::new(model.sessions().max(1)));
    loop {
        let Ok(session) = sessions.clone().acquire_owned().await else { return };
        let Some(first) = rx.recv().await else { return };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + window;
        while batch.len() < max_batch {
            // Whatever is already waiting, then what arrives before the deadline.
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                // Nobody else on the way: run now rather than wait for no one.
                Err(_) if in_flight() <= batch.len() => break,
                Err(_) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(job)) => batch.push(job),
                    _ => break,
                },
            }
        }
        on_batch(batch.len());
        let model = model.clone();
        tokio::task::spawn_blocking(move || {
            let _session = session;
            let n = batch.len();
            let mut input = Vec::with_capacity(n * model.preprocess().tensor_len());
            let mut replies = Vec::with_capacity(n);
            let mut held = Vec::with_capacity(n);
            for (tensor, reply, hold) in batch {
                input.extend_from_slice(&tensor);
                replies.push(reply);
                held.push(hold);
            }
            match model.embed(&input, n) {
                Ok(vectors) => {
                    for (reply, v) in replies.into_iter().zip(vectors) {
                        let _ = reply.send(Ok(v)); // a request that is gone needs no answer
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    for reply in replies {
                        let _ = reply.send(Err(ModelError::Setup(msg.clone())));
                    }
                }
            }
        });
    }
}
