//! Domain facts every part shares, with no dependency on the rest of the crate: which model and
//! precision made a collection's vectors, and which vector index (and so which metric) it has.
//! `embed`, `store`, `crd` and the roles above them all point here; this module points nowhere.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Numeric precision of the model's arithmetic. Lower precisions are separate ONNX files made
/// from the fp32 one by `hack/quantize.py`, stamped with `imageindex.precision` metadata.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    /// Half precision, for GPUs (tensor cores); slow on CPUs.
    Fp16,
    /// Static int8 quantization (QDQ, per-channel weights), for CPUs.
    Int8,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(s, true)
    }
}

/// Which vectors a model makes: the fp32 model it comes from (by file name) and its precision.
/// Recorded with the collection in Milvus and the catalog, and checked before anything is written,
/// because vectors of different models never compare, and of different precisions only as well as
/// the parity check says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelId {
    pub model: String,
    pub precision: Precision,
}

impl std::fmt::Display for ModelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.model, self.precision)
    }
}

impl std::str::FromStr for ModelId {
    type Err = String;
    /// `resnet50.onnx@int8`; a bare name (rows written before precisions existed) is fp32.
    fn from_str(s: &str) -> Result<Self, String> {
        let (model, precision) = match s.rsplit_once('@') {
            Some((m, p)) => (m, p.parse()?),
            None => (s, Precision::Fp32),
        };
        Ok(Self { model: model.to_string(), precision })
    }
}

impl ModelId {
    /// May vectors from `self` go where `recorded` ones are? `what` names the place, for the message.
    pub fn check(&self, recorded: &ModelId, mixed_precision: bool, what: &str) -> Result<(), ModelMismatch> {
        if recorded.model != self.model {
            return Err(ModelMismatch(format!(
                "{what} holds vectors of model {}, but this model is {}: vectors of different models do not \
                 compare; use another collection",
                recorded.model, self.model
            )));
        }
        if recorded.precision != self.precision && !mixed_precision {
            return Err(ModelMismatch(format!(
                "{what} holds {} vectors of {}, but this model makes {} ones: precisions do not mix unless \
                 the parity check says they agree (README, \"Precision\"); use --precision {} or another \
                 collection, or --allow-mixed-precision",
                recorded.precision, recorded.model, self.precision, recorded.precision
            )));
        }
        Ok(())
    }
}

/// Vectors of one model or precision about to go where another's are.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ModelMismatch(pub String);

/// The vector index of a collection, and with it how distances are measured: the flag, the CRD
/// field and the Milvus index all use this one enum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize, JsonSchema)]
pub enum IndexKind {
    // Graph index, cosine similarity (higher is closer). The default.
    // (Plain comments: doc comments would change the CRD's generated enum schema.)
    #[default]
    #[value(name = "HNSW")]
    #[serde(rename = "HNSW")]
    Hnsw,
    // Inverted lists, L2 distance (lower is closer): what the Milvus bootcamp uses.
    #[value(name = "IVF_FLAT")]
    #[serde(rename = "IVF_FLAT")]
    IvfFlat,
}

impl IndexKind {
    /// The name the flag, the env var and the CRD use.
    pub fn as_str(self) -> &'static str {
        match self {
            IndexKind::Hnsw => "HNSW",
            IndexKind::IvfFlat => "IVF_FLAT",
        }
    }

    /// The metric's name, as the search API reports it.
    pub fn metric(self) -> &'static str {
        match self {
            IndexKind::Hnsw => "COSINE",
            IndexKind::IvfFlat => "L2",
        }
    }

    /// Cosine is a similarity (higher is closer); L2 a distance.
    pub fn higher_is_closer(self) -> bool {
        self == IndexKind::Hnsw
    }
}

/// A credential (a MySQL URL with its password, a token): `Debug` prints `<redacted>`, so no
/// log line, panic message or `{:?}` of a config shows it. `expose` is the one way to read it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Redacted(String);

impl Redacted {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Redacted {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(s))
    }
}

impl From<String> for Redacted {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for Redacted {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_round_trip_and_mismatches_are_refused() {
        let int8: ModelId = "resnet50.onnx@int8".parse().unwrap();
        assert_eq!(int8, ModelId { model: "resnet50.onnx".into(), precision: Precision::Int8 });
        assert_eq!(int8.to_string(), "resnet50.onnx@int8");
        let legacy: ModelId = "resnet50.onnx".parse().unwrap();
        assert_eq!(legacy.precision, Precision::Fp32);
        assert!("resnet50.onnx@int4".parse::<ModelId>().is_err());

        int8.check(&int8, false, "collection c").unwrap();
        let err = int8.check(&legacy, false, "collection c").unwrap_err().to_string();
        assert!(err.contains("holds fp32 vectors") && err.contains("--precision fp32"), "{err}");
        int8.check(&legacy, true, "collection c").expect("allowed when asked for");
        let other = ModelId { model: "clip.onnx".into(), precision: Precision::Int8 };
        let err = other.check(&int8, true, "collection c").unwrap_err().to_string();
        assert!(err.contains("different models"), "{err}");
    }

    #[test]
    fn index_names_agree_with_clap() {
        for kind in [IndexKind::Hnsw, IndexKind::IvfFlat] {
            assert_eq!(<IndexKind as clap::ValueEnum>::from_str(kind.as_str(), false), Ok(kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }
}
