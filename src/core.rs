//! Domain facts every part shares, with no dependency on the rest of the crate: which model,
//! precision and preprocessing made a collection's vectors, and which vector index (and so which
//! metric) it has; an object as a bucket lists it; and the backends' one error (`error`).
//! `embed`, `bucket`, `store`, `crd` and the roles above them all point here; this module points
//! nowhere.

pub mod error;

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

/// How images become the model's input: resize the shorter side to `resize` (antialiased, as
/// PIL resizes), crop the centre `crop` x `crop`, scale levels to 0..1, subtract `mean` and divide
/// by `std` per channel. A model's profile is recorded in its ONNX metadata
/// (`imageindex.preprocess`) by the scripts that make it, or declared with `--preprocess`; either
/// the name of a known one or the whole declaration, `resize=256,crop=224,filter=bilinear,
/// mean=0.485/0.456/0.406,std=0.229/0.224/0.225`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Preprocess {
    pub resize: u32,
    pub crop: u32,
    pub filter: ResizeFilter,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// The resampling filter of the resize.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeFilter {
    Bilinear,
    /// PIL's bicubic (Catmull-Rom, a = -0.5), which torchvision uses on PIL images.
    Bicubic,
}

impl Preprocess {
    /// torchvision's ImageNet classifiers (ResNet and most others): `Resize(256, bilinear)`,
    /// `CenterCrop(224)`, ImageNet mean and std. The profile of models that record none.
    pub const TORCHVISION: Self = Self {
        resize: 256,
        crop: 224,
        filter: ResizeFilter::Bilinear,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
    /// OpenAI CLIP's image encoders (ViT-B/32, ViT-B/16 at 224): `Resize(224, bicubic)`,
    /// `CenterCrop(224)`, CLIP's mean and std.
    pub const CLIP: Self = Self {
        resize: 224,
        crop: 224,
        filter: ResizeFilter::Bicubic,
        mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
        std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
    };
    const NAMED: [(&str, Self); 2] = [("torchvision", Self::TORCHVISION), ("clip", Self::CLIP)];

    /// Floats in one preprocessed image: 3 x crop x crop, CHW.
    pub fn tensor_len(&self) -> usize {
        3 * self.crop as usize * self.crop as usize
    }

    fn name(&self) -> Option<&'static str> {
        Self::NAMED.iter().find(|(_, p)| p == self).map(|(n, _)| *n)
    }
}

impl Default for Preprocess {
    fn default() -> Self {
        Self::TORCHVISION
    }
}

impl std::fmt::Display for Preprocess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(name) = self.name() {
            return f.write_str(name);
        }
        let three = |v: [f32; 3]| v.map(|x| x.to_string()).join("/");
        let filter = match self.filter {
            ResizeFilter::Bilinear => "bilinear",
            ResizeFilter::Bicubic => "bicubic",
        };
        write!(
            f,
            "resize={},crop={},filter={filter},mean={},std={}",
            self.resize,
            self.crop,
            three(self.mean),
            three(self.std)
        )
    }
}

impl std::str::FromStr for Preprocess {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some((_, p)) = Self::NAMED.iter().find(|(n, _)| *n == s.trim()) {
            return Ok(*p);
        }
        if !s.contains('=') {
            let names: Vec<&str> = Self::NAMED.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "unknown preprocessing {s:?}: name one of {} or declare it as resize=N,crop=N,filter=bilinear|bicubic,\
                 mean=R/G/B,std=R/G/B",
                names.join(", ")
            ));
        }
        let (mut resize, mut crop, mut filter, mut mean, mut std) = (None, None, None, None, None);
        let three = |v: &str| -> Result<[f32; 3], String> {
            let parts: Vec<f32> =
                v.split('/').map(|x| x.trim().parse::<f32>()).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
            <[f32; 3]>::try_from(parts).map_err(|_| format!("{v:?} is not three numbers R/G/B"))
        };
        for part in s.split(',') {
            let (key, value) = part.split_once('=').ok_or_else(|| format!("{part:?} in {s:?} is not key=value"))?;
            let value = value.trim();
            let size = || value.parse::<u32>().map_err(|e| format!("{key}={value}: {e}"));
            match key.trim() {
                "resize" => resize = Some(size()?),
                "crop" => crop = Some(size()?),
                "filter" => {
                    filter = Some(match value {
                        "bilinear" => ResizeFilter::Bilinear,
                        "bicubic" => ResizeFilter::Bicubic,
                        other => return Err(format!("filter={other}: bilinear or bicubic")),
                    })
                }
                "mean" => mean = Some(three(value)?),
                "std" => std = Some(three(value)?),
                other => return Err(format!("unknown key {other:?} in {s:?} (resize, crop, filter, mean, std)")),
            }
        }
        let missing = |k: &str| format!("{s:?} does not say {k}");
        let p = Self {
            resize: resize.ok_or_else(|| missing("resize"))?,
            crop: crop.ok_or_else(|| missing("crop"))?,
            filter: filter.ok_or_else(|| missing("filter"))?,
            mean: mean.ok_or_else(|| missing("mean"))?,
            std: std.ok_or_else(|| missing("std"))?,
        };
        // Bounds that keep the tensor and the resize sane whatever a file says.
        if !(16..=1024).contains(&p.crop) || !(p.crop..=2048).contains(&p.resize) {
            return Err(format!("{s:?}: crop must be 16 to 1024 pixels, and resize at least crop and at most 2048"));
        }
        if p.mean.iter().any(|m| !(0.0..=1.0).contains(m)) || p.std.iter().any(|d| !(*d > 0.0 && *d <= 10.0)) {
            return Err(format!("{s:?}: mean must be within 0 to 1, and std above 0 and at most 10"));
        }
        Ok(p)
    }
}

/// Which vectors a model makes: the fp32 model it comes from (by file name), its precision and
/// its preprocessing. Recorded with the collection in Milvus and the catalog, and checked before
/// anything is written, because vectors of different models (or of one model fed differently)
/// never compare, and of different precisions only as well as the parity check says.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelId {
    pub model: String,
    pub precision: Precision,
    pub preprocess: Preprocess,
}

impl std::fmt::Display for ModelId {
    /// `resnet50.onnx@int8`, with `+<preprocessing>` after it unless that is torchvision's.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.model, self.precision)?;
        if self.preprocess != Preprocess::TORCHVISION {
            write!(f, "+{}", self.preprocess)?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ModelId {
    type Err = String;
    /// `resnet50.onnx@int8`, `clip.onnx@fp32+clip`; a bare name (rows written before precisions
    /// existed) is fp32. No preprocessing named is torchvision's.
    fn from_str(s: &str) -> Result<Self, String> {
        let (model, rest) = match s.rsplit_once('@') {
            Some((m, rest)) => (m, Some(rest)),
            None => (s, None),
        };
        let (precision, preprocess) = match rest.map(|r| r.split_once('+').unwrap_or((r, ""))) {
            None => (Precision::Fp32, Preprocess::TORCHVISION),
            Some((p, "")) => (p.parse()?, Preprocess::TORCHVISION),
            Some((p, pre)) => (p.parse()?, pre.parse()?),
        };
        Ok(Self { model: model.to_string(), precision, preprocess })
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
        if recorded.preprocess != self.preprocess {
            return Err(ModelMismatch(format!(
                "{what} holds vectors of {} fed with {} preprocessing, but this model is fed with {}: vectors \
                 of differently prepared images do not compare; use another collection",
                recorded.model, recorded.preprocess, self.preprocess
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

/// `text` with the query string and any password of every URL in it replaced by `<redacted>`:
/// HTTP clients put the URL in their errors, and a presigned S3 URL's query holds the access key
/// id, the signature and the session token, an Azure SAS its signature. For every error text
/// that leaves the process (status, events, the catalog, logs).
pub fn without_secrets(text: &str) -> String {
    // Where a URL ends in an error text: whitespace, quotes, brackets.
    let ends = |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ')' | '(' | '<' | '>' | '[' | ']' | '`');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        // The scheme: the letters (and + - .) right before "://".
        let scheme = rest[..at]
            .char_indices()
            .rev()
            .take_while(|(_, c)| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            .last()
            .map_or(at, |(i, _)| i);
        let after = at + 3;
        let len = rest[after..].find(ends).unwrap_or(rest.len() - after);
        let url = &rest[after..after + len];
        out.push_str(&rest[..after]);
        if scheme == at {
            out.push_str(url); // no scheme: not a URL
        } else {
            let (mut base, query) = match url.find('?') {
                Some(q) => (url[..q].to_string(), Some(())),
                None => (url.to_string(), None),
            };
            // user:password@host: keep the user.
            let authority_end = base.find('/').unwrap_or(base.len());
            if let Some(at_sign) = base[..authority_end].rfind('@')
                && let Some(colon) = base[..at_sign].find(':')
            {
                base.replace_range(colon + 1..at_sign, "<redacted>");
            }
            out.push_str(&base);
            if query.is_some() {
                out.push_str("?<redacted>");
            }
        }
        rest = &rest[after + len..];
    }
    out.push_str(rest);
    out
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

/// One object as a bucket lists it. `key` is relative to the source prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    pub key: String,
    pub etag: Option<String>,
    pub size: u64,
    /// In an archive tier (S3 `GLACIER` and `DEEP_ARCHIVE`, Azure `Archive`): a GET is refused
    /// until it is restored, so it is recorded as skipped, never fetched.
    pub archived: bool,
}

#[cfg(test)]
mod tests {
    use super::without_secrets;

    #[test]
    fn urls_lose_their_queries_and_passwords_in_error_text() {
        let presigned = "error sending request for url (http://127.0.0.1:1/b?list-type=2&X-Amz-Algorithm=AWS4-HMAC-SHA256\
                         &X-Amz-Credential=AKIAEXAMPLE%2F20261207&X-Amz-Signature=abc123&X-Amz-Security-Token=tok)";
        assert_eq!(without_secrets(presigned), "error sending request for url (http://127.0.0.1:1/b?<redacted>)");
        let sas = "Error performing GET https://acct.blob.core.windows.net/c/a.jpg?sv=2022&sig=SECRET in 2ms";
        assert_eq!(
            without_secrets(sas),
            "Error performing GET https://acct.blob.core.windows.net/c/a.jpg?<redacted> in 2ms"
        );
        let mysql = "connecting to mysql://imageindex:hunter2@db:3306/catalog: refused";
        assert_eq!(without_secrets(mysql), "connecting to mysql://imageindex:<redacted>@db:3306/catalog: refused");
        for plain in ["no URL here", "a ratio 3://4 is odd", "", "ends with http://", "key \"a?b.jpg\" refused"] {
            assert_eq!(without_secrets(plain), plain);
        }
        let two = "GET http://a/x?sig=1 then \"https://b/y?sig=2\"";
        assert_eq!(without_secrets(two), "GET http://a/x?<redacted> then \"https://b/y?<redacted>\"");
    }

    use super::*;

    #[test]
    fn model_ids_round_trip_and_mismatches_are_refused() {
        let int8: ModelId = "resnet50.onnx@int8".parse().unwrap();
        let torchvision = Preprocess::TORCHVISION;
        assert_eq!(
            int8,
            ModelId { model: "resnet50.onnx".into(), precision: Precision::Int8, preprocess: torchvision }
        );
        assert_eq!(int8.to_string(), "resnet50.onnx@int8");
        let legacy: ModelId = "resnet50.onnx".parse().unwrap();
        assert_eq!(legacy.precision, Precision::Fp32);
        assert!("resnet50.onnx@int4".parse::<ModelId>().is_err());

        int8.check(&int8, false, "collection c").unwrap();
        let err = int8.check(&legacy, false, "collection c").unwrap_err().to_string();
        assert!(err.contains("holds fp32 vectors") && err.contains("--precision fp32"), "{err}");
        int8.check(&legacy, true, "collection c").expect("allowed when asked for");
        let other = ModelId { model: "clip.onnx".into(), precision: Precision::Int8, preprocess: torchvision };
        let err = other.check(&int8, true, "collection c").unwrap_err().to_string();
        assert!(err.contains("different models"), "{err}");

        // The preprocessing is part of the id, named when it is not torchvision's.
        let clip: ModelId = "openai/clip@vit-b32.onnx@fp16+clip".parse().unwrap();
        assert_eq!(
            (clip.model.as_str(), clip.precision, clip.preprocess),
            ("openai/clip@vit-b32.onnx", Precision::Fp16, Preprocess::CLIP)
        );
        assert_eq!(clip.to_string(), "openai/clip@vit-b32.onnx@fp16+clip");
        let fed_otherwise = ModelId { preprocess: Preprocess::CLIP, ..int8.clone() };
        let err = fed_otherwise.check(&int8, true, "collection c").unwrap_err().to_string();
        assert!(err.contains("torchvision preprocessing") && err.contains("fed with clip"), "{err}");
    }

    #[test]
    fn preprocessing_is_named_or_declared_and_bounded() {
        assert_eq!("torchvision".parse::<Preprocess>().unwrap(), Preprocess::TORCHVISION);
        assert_eq!("clip".parse::<Preprocess>().unwrap(), Preprocess::CLIP);
        // A declaration equal to a named profile prints as its name; any other round-trips.
        let declared = "resize=256,crop=224,filter=bilinear,mean=0.485/0.456/0.406,std=0.229/0.224/0.225";
        assert_eq!(declared.parse::<Preprocess>().unwrap().to_string(), "torchvision");
        let dino = "resize=256,crop=224,filter=bicubic,mean=0.485/0.456/0.406,std=0.229/0.224/0.225";
        let parsed: Preprocess = dino.parse().unwrap();
        assert_eq!((parsed.filter, parsed.tensor_len()), (ResizeFilter::Bicubic, 3 * 224 * 224));
        assert_eq!(parsed.to_string(), dino);
        assert_eq!(parsed.to_string().parse::<Preprocess>().unwrap(), parsed);
        let id = ModelId { model: "dinov2-s.onnx".into(), precision: Precision::Fp32, preprocess: parsed };
        assert_eq!(id.to_string().parse::<ModelId>().unwrap(), id);
        for bad in [
            "imagenet",
            "resize=256,crop=224",
            "resize=100,crop=224,filter=bilinear,mean=0.5/0.5/0.5,std=0.5/0.5/0.5",
            "resize=99999,crop=224,filter=bilinear,mean=0.5/0.5/0.5,std=0.5/0.5/0.5",
            "resize=256,crop=224,filter=lanczos,mean=0.5/0.5/0.5,std=0.5/0.5/0.5",
            "resize=256,crop=224,filter=bilinear,mean=0.5/0.5,std=0.5/0.5/0.5",
            "resize=256,crop=224,filter=bilinear,mean=0.5/0.5/0.5,std=0/0.5/0.5",
            "resize=256,crop=224,filter=bilinear,mean=0.5/0.5/0.5,std=0.5/0.5/0.5,gamma=2",
        ] {
            assert!(bad.parse::<Preprocess>().is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn index_names_agree_with_clap() {
        for kind in [IndexKind::Hnsw, IndexKind::IvfFlat] {
            assert_eq!(<IndexKind as clap::ValueEnum>::from_str(kind.as_str(), false), Ok(kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }
}
