//! What the operator's short Jobs (`imageindex plan`, `imageindex cleanup`) found, as they tell
//! it: a small JSON document written as the pod's termination message, which the controller reads
//! from the pod's status. That way the controller needs no Secret, no Milvus, MySQL or bucket
//! connection of its own: the data-plane calls run in the ImageIndex's namespace with the
//! credentials its pods get.

use serde::{Deserialize, Serialize};

/// The kubelet keeps at most 4096 bytes of a termination message.
pub const MAX_BYTES: usize = 4096;
/// A message longer than this is cut, so that the document always fits.
const MAX_MESSAGE: usize = 1500;

// One report per Job, written once and read once: its size in memory does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum Report {
    /// The collection is ready and the bucket was diffed against the catalog.
    #[serde(rename_all = "camelCase")]
    Planned {
        /// The plan's id in the catalog: the embedding Job carries out this one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        plan: Option<i64>,
        /// Objects in the bucket.
        discovered: u64,
        /// Objects new, changed or deleted since the catalog saw them.
        pending: u64,
        /// Why the deletions the listing implies are refused (see `DeletionGuard`), if they are.
        refused: Option<String>,
        /// The catalog's counts (of the serving generation).
        indexed: u64,
        failed: u64,
        /// Indexed objects whose newer version could not be read: the bucket refused or kept
        /// failing the GET (search keeps the older version).
        #[serde(default, skip_serializing_if = "is_zero")]
        stale: u64,
        /// Deletions the listing implies, held back because many objects could not be read
        /// (see `DeletionGuard::holds`); a later plan makes them once the objects are read again.
        #[serde(default, skip_serializing_if = "is_zero")]
        held: u64,
        /// The index's generations, once it has more than its first collection.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        generations: Option<GenerationsReport>,
    },
    /// It stopped at `at`; `message` says why.
    Stopped { at: Stop, message: String },
    /// `Delete`: the collection and its catalog rows are gone.
    Dropped,
    /// `Delete`, but they are kept: `why` (another index holds them, or none is recorded).
    Kept { why: String },
    /// `Retain`: the collection's claim is let go; everything is kept.
    Released,
}

/// The index's generations as a plan left them (see `index::generations`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerationsReport {
    /// What search reads.
    pub serving: Option<GenerationReport>,
    /// What is being built for the model the spec asks for (the plan's work is for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub building: Option<GenerationReport>,
    /// This plan moved search to the generation that was being built.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub swapped: bool,
}

/// One generation: also what `status.generations` shows of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GenerationReport {
    pub number: u32,
    /// Its Milvus collection.
    pub collection: String,
    /// The model its vectors come from (`resnet50.onnx@fp32`), once recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Objects with a vector in it.
    pub indexed: u64,
    pub failed: u64,
    /// Indexed objects whose newer version could not be read (search has the older one).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stale: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Where a plan or cleanup stopped. The controller turns each into a condition and a reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Stop {
    MilvusUnavailable,
    MysqlUnavailable,
    /// The collection holds another model's vectors (a configuration error: no retry helps).
    ModelMismatch,
    /// The model file cannot be read, or does not say what vectors it makes (a configuration error).
    ModelUnusable,
    /// The collection has another index type (a configuration error).
    IndexMismatch,
    /// Another index owns the collection (a configuration error).
    Claimed,
    /// Milvus answered, but the collection could not be made, indexed or loaded.
    CollectionUnavailable,
    /// The bucket could not be listed.
    SourceUnavailable,
}

impl Stop {
    /// A spec or data error no retry can fix: the Job exits `contract::EXIT_CONFIG`.
    pub fn is_config(self) -> bool {
        matches!(self, Stop::ModelMismatch | Stop::ModelUnusable | Stop::IndexMismatch | Stop::Claimed)
    }
}

impl Report {
    pub fn stopped(at: Stop, message: impl std::fmt::Display) -> Self {
        let mut message = message.to_string();
        if message.len() > MAX_MESSAGE {
            let cut = (0..=MAX_MESSAGE).rev().find(|&i| message.is_char_boundary(i)).unwrap_or(0);
            message.truncate(cut);
            message.push('…');
        }
        Report::Stopped { at, message }
    }

    /// As written to the termination message: one line of JSON, within `MAX_BYTES`.
    pub fn to_json(&self) -> String {
        let mut report = self.clone();
        if let Report::Planned { refused: Some(r), .. } | Report::Kept { why: r } = &mut report
            && r.len() > MAX_MESSAGE
        {
            let cut = (0..=MAX_MESSAGE).rev().find(|&i| r.is_char_boundary(i)).unwrap_or(0);
            r.truncate(cut);
        }
        serde_json::to_string(&report).expect("a report serializes")
    }

    /// From a termination message; None for anything else (a pod killed before it wrote one).
    pub fn parse(message: &str) -> Option<Self> {
        serde_json::from_str(message.trim()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_fit_a_termination_message_and_read_back() {
        let long = "é".repeat(5000);
        for r in [
            Report::stopped(Stop::MilvusUnavailable, &long),
            Report::Planned {
                plan: Some(5),
                discovered: 3,
                pending: 1,
                refused: Some(long.clone()),
                indexed: 2,
                failed: 0,
                stale: 0,
                held: u64::MAX,
                generations: Some(GenerationsReport {
                    serving: Some(GenerationReport {
                        number: 1,
                        collection: "c".repeat(255),
                        model: Some("m".repeat(255)),
                        indexed: 2,
                        failed: 0,
                        stale: 0,
                    }),
                    building: Some(GenerationReport {
                        number: 2,
                        collection: "c".repeat(255),
                        model: Some("m".repeat(255)),
                        indexed: 1,
                        failed: 0,
                        stale: 0,
                    }),
                    swapped: false,
                }),
            },
            Report::Kept { why: long.clone() },
            Report::Dropped,
        ] {
            let json = r.to_json();
            assert!(json.len() <= MAX_BYTES, "{} bytes", json.len());
            assert!(Report::parse(&json).is_some(), "{json}");
        }
        let planned = Report::Planned {
            plan: Some(5),
            discovered: 3,
            pending: 1,
            refused: None,
            indexed: 2,
            failed: 0,
            stale: 0,
            held: 0,
            generations: None,
        };
        assert_eq!(Report::parse(&planned.to_json()), Some(planned));
        assert_eq!(
            Report::parse(r#"{"outcome":"stopped","at":"modelMismatch","message":"holds fp16"}"#),
            Some(Report::Stopped { at: Stop::ModelMismatch, message: "holds fp16".into() })
        );
        assert_eq!(Report::parse("panicked at ..."), None);
        assert!(Stop::Claimed.is_config() && !Stop::SourceUnavailable.is_config());
    }
}
