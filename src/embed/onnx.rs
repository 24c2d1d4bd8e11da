//! What an ONNX file says about itself, read without loading it: its metadata (`imageindex.*`)
//! and the width of its output. The file is walked as protobuf fields, and the weights (the
//! graph's initializers, nearly all of a model's bytes) are skipped by seeking, so a 1 GB model
//! costs a few small reads and no memory. The plan Job uses it: it names the model's vectors and
//! makes their collection, but never runs the model.
//!
//! The messages read are ONNX's own (onnx.proto3): ModelProto.graph (7), .metadata_props (14);
//! GraphProto.output (12); ValueInfoProto.type (2); TypeProto.tensor_type (1); its shape (2);
//! TensorShapeProto.dim (1); Dimension.dim_value (1).

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use prost::Message;

/// Metadata and the output shape of an ONNX model file.
#[derive(Debug, Default)]
pub struct Header {
    pub metadata: HashMap<String, String>,
    /// The first output's dimensions: a number where fixed, None where symbolic (the batch).
    pub output_shape: Vec<Option<i64>>,
}

impl Header {
    /// The width of the vectors: the last output dimension, where the file fixes it.
    pub fn output_width(&self) -> Option<usize> {
        match self.output_shape.as_slice() {
            [_, Some(d)] if *d > 0 => usize::try_from(*d).ok(),
            _ => None,
        }
    }
}

/// The largest field read into memory (an output's description, one metadata entry); anything
/// larger is not what a model file holds there.
const MAX_SMALL_FIELD: u64 = 1 << 20;

#[derive(Clone, PartialEq, Message)]
struct Entry {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(string, tag = "2")]
    value: String,
}

#[derive(Clone, PartialEq, Message)]
struct ValueInfo {
    #[prost(message, optional, tag = "2")]
    r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TypeProto {
    #[prost(message, optional, tag = "1")]
    tensor_type: Option<TensorType>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorType {
    #[prost(message, optional, tag = "2")]
    shape: Option<Shape>,
}

#[derive(Clone, PartialEq, Message)]
struct Shape {
    #[prost(message, repeated, tag = "1")]
    dim: Vec<Dim>,
}

#[derive(Clone, PartialEq, Message)]
struct Dim {
    #[prost(int64, optional, tag = "1")]
    dim_value: Option<i64>,
}

/// A protobuf message's fields, read from a file in order.
struct Fields<R> {
    r: R,
    pos: u64,
}

enum Value {
    /// A length-delimited field: its length; the reader stands at its first byte.
    Bytes(u64),
    /// Any other wire type, already consumed.
    Scalar,
}

impl<R: Read + Seek> Fields<R> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let mut b = [0u8];
            self.r.read_exact(&mut b).map_err(|e| format!("reading at byte {}: {e}", self.pos))?;
            self.pos += 1;
            v |= u64::from(b[0] & 0x7f) << shift;
            if b[0] & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("a malformed number at byte {}", self.pos))
    }

    /// The next field of a message that ends at `end`: (field number, value). None at the end.
    fn next(&mut self, end: u64) -> Result<Option<(u64, Value)>, String> {
        if self.pos >= end {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => {
                self.varint()?;
                Value::Scalar
            }
            1 => self.skip(8, end).map(|()| Value::Scalar)?,
            5 => self.skip(4, end).map(|()| Value::Scalar)?,
            2 => {
                let len = self.varint()?;
                if len > end.saturating_sub(self.pos) {
                    return Err(format!("a field of {len} bytes at byte {} runs past its message", self.pos));
                }
                Value::Bytes(len)
            }
            t => return Err(format!("wire type {t} at byte {}: not an ONNX model", self.pos)),
        };
        Ok(Some((key >> 3, value)))
    }

    fn skip(&mut self, len: u64, end: u64) -> Result<(), String> {
        if len > end.saturating_sub(self.pos) {
            return Err(format!("the file ends inside a field at byte {}", self.pos));
        }
        let len_i = i64::try_from(len).map_err(|_| "a field too long to skip".to_string())?;
        self.r.seek_relative(len_i).map_err(|e| format!("seeking past byte {}: {e}", self.pos))?;
        self.pos += len;
        Ok(())
    }

    fn read<M: Message + Default>(&mut self, len: u64) -> Result<M, String> {
        if len > MAX_SMALL_FIELD {
            return Err(format!("a {len}-byte description at byte {}: not an ONNX model", self.pos));
        }
        let mut buf = vec![0; len as usize];
        self.r.read_exact(&mut buf).map_err(|e| format!("reading at byte {}: {e}", self.pos))?;
        self.pos += len;
        M::decode(buf.as_slice()).map_err(|e| format!("decoding the field before byte {}: {e}", self.pos))
    }
}

/// Reads the metadata and output shape of the ONNX model at `path`.
pub fn read_header(path: &Path) -> Result<Header, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let end = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?.len();
    read_from(BufReader::new(file), end).map_err(|e| format!("{}: {e}", path.display()))
}

fn read_from(r: impl Read + Seek, end: u64) -> Result<Header, String> {
    let mut fields = Fields { r, pos: 0 };
    let mut header = Header::default();
    let mut graph_seen = false;
    while let Some((field, value)) = fields.next(end)? {
        match (field, value) {
            (7, Value::Bytes(len)) => {
                graph_seen = true;
                let graph_end = fields.pos + len;
                while let Some((field, value)) = fields.next(graph_end)? {
                    match (field, value) {
                        (12, Value::Bytes(len)) if header.output_shape.is_empty() => {
                            let output: ValueInfo = fields.read(len)?;
                            let dims = output.r#type.and_then(|t| t.tensor_type).and_then(|t| t.shape);
                            header.output_shape =
                                dims.map(|s| s.dim.into_iter().map(|d| d.dim_value).collect()).unwrap_or_default();
                        }
                        (_, Value::Bytes(len)) => fields.skip(len, graph_end)?,
                        (_, Value::Scalar) => {}
                    }
                }
            }
            (14, Value::Bytes(len)) => {
                let entry: Entry = fields.read(len)?;
                header.metadata.insert(entry.key, entry.value);
            }
            (_, Value::Bytes(len)) => fields.skip(len, end)?,
            (_, Value::Scalar) => {}
        }
    }
    if !graph_seen {
        return Err("no graph: not an ONNX model".into());
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[derive(Clone, PartialEq, Message)]
    struct Graph {
        #[prost(bytes = "vec", repeated, tag = "5")]
        initializer: Vec<Vec<u8>>,
        #[prost(message, repeated, tag = "12")]
        output: Vec<ValueInfo>,
    }

    #[derive(Clone, PartialEq, Message)]
    struct Model {
        #[prost(int64, tag = "1")]
        ir_version: i64,
        #[prost(message, optional, tag = "7")]
        graph: Option<Graph>,
        #[prost(message, repeated, tag = "14")]
        metadata_props: Vec<Entry>,
    }

    fn output(dims: &[Option<i64>]) -> ValueInfo {
        let dim = dims.iter().map(|&dim_value| Dim { dim_value }).collect();
        ValueInfo { r#type: Some(TypeProto { tensor_type: Some(TensorType { shape: Some(Shape { dim }) }) }) }
    }

    fn header_of(m: &Model) -> Result<Header, String> {
        let bytes = m.encode_to_vec();
        read_from(Cursor::new(&bytes), bytes.len() as u64)
    }

    #[test]
    fn metadata_and_output_width_are_read_past_the_weights() {
        let model = Model {
            ir_version: 8,
            graph: Some(Graph {
                initializer: vec![vec![7; 3 << 20], vec![1; 10]],
                output: vec![output(&[None, Some(512)]), output(&[None, Some(1000)])],
            }),
            metadata_props: vec![
                Entry { key: "imageindex.preprocess".into(), value: "clip".into() },
                Entry { key: "imageindex.precision".into(), value: "int8".into() },
            ],
        };
        let h = header_of(&model).unwrap();
        assert_eq!(h.output_width(), Some(512), "the first output's width");
        assert_eq!(h.metadata["imageindex.preprocess"], "clip");
        assert_eq!(h.metadata.len(), 2);
        // A symbolic width is unknown; so is a shape that is not [N, D].
        let symbolic =
            Model { graph: Some(Graph { output: vec![output(&[None, None])], ..Default::default() }), ..model.clone() };
        assert_eq!(header_of(&symbolic).unwrap().output_width(), None);
        let map = Model {
            graph: Some(Graph { output: vec![output(&[None, Some(2048), Some(7)])], ..Default::default() }),
            ..model.clone()
        };
        assert_eq!(header_of(&map).unwrap().output_width(), None);
    }

    #[test]
    fn what_is_not_a_model_is_refused() {
        let model = Model {
            ir_version: 8,
            graph: Some(Graph { output: vec![output(&[None, Some(8)])], ..Default::default() }),
            ..Default::default()
        };
        let bytes = model.encode_to_vec();
        for cut in [bytes.len() - 1, bytes.len() / 2, 3] {
            assert!(read_from(Cursor::new(&bytes[..cut]), cut as u64).is_err(), "cut at {cut}");
        }
        let no_graph = Model { ir_version: 8, ..Default::default() }.encode_to_vec();
        assert!(read_from(Cursor::new(&no_graph), no_graph.len() as u64).unwrap_err().contains("no graph"));
        let jpeg = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rocket.jpg")).unwrap();
        assert!(read_from(Cursor::new(&jpeg), jpeg.len() as u64).is_err());
    }
}
