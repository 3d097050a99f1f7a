//! ONNX models as sagan-infer (generators) and sagan-eval (feature networks) load and run them.

use crate::harness::{Fuzz, Outcome};
use crate::{common, fixture, mutate, outcome, read, write};
use candle_onnx::onnx::tensor_shape_proto::{dimension, Dimension};
use candle_onnx::onnx::{type_proto, ModelProto, StringStringEntryProto, ValueInfoProto};
use prost::Message;
use rand::seq::IndexedRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use sagan::eval::{FeatureNet, FeatureNetOptions};
use sagan::image_io::ImageBatch;
use sagan::infer::{Generator, LibrarySearch, LoadOptions, Runtime};

/// One ONNX Runtime environment per process: the tests share it.
fn runtime() -> &'static Runtime {
    Runtime::init(&LibrarySearch {
        explicit: Some(common::ort_lib()),
        ..Default::default()
    })
    .expect("ONNX Runtime")
}

/// The largest latent size a case may run with; a loader that accepts more trusted a header.
const MAX_Z: usize = 1 << 20;

/// A dimension as a mutated file might declare it.
fn dimension(rng: &mut ChaCha8Rng) -> Dimension {
    let value = match rng.random_range(0..4) {
        0 => dimension::Value::DimParam(
            ["batch", "", "x\ny", "z_dim"]
                .choose(rng)
                .unwrap_or(&"")
                .to_string(),
        ),
        1 => dimension::Value::DimValue(*[0i64, -1, 1, 2, 3, 8].choose(rng).unwrap_or(&0)),
        _ => dimension::Value::DimValue(mutate::interesting(rng) as i64),
    };
    Dimension {
        denotation: String::new(),
        value: Some(value),
    }
}

/// Edits a declared input or output: a dimension, the element type, the rank or the name.
fn edit_value_info(rng: &mut ChaCha8Rng, info: &mut ValueInfoProto) -> String {
    let name = info.name.clone();
    let Some(type_proto::Value::TensorType(tensor)) =
        info.r#type.as_mut().and_then(|t| t.value.as_mut())
    else {
        return format!("'{name}' is not a tensor");
    };
    let dims = &mut tensor.shape.get_or_insert_with(Default::default).dim;
    match rng.random_range(0..6) {
        0..=2 if !dims.is_empty() => {
            let i = rng.random_range(0..dims.len());
            dims[i] = dimension(rng);
            format!("'{name}' dimension {i} = {:?}", dims[i].value)
        }
        3 => {
            tensor.elem_type = *[0, 1, 6, 7, 10, 11, 16, 99].choose(rng).unwrap_or(&0);
            format!("'{name}' element type {}", tensor.elem_type)
        }
        4 => {
            if rng.random_bool(0.5) {
                dims.pop();
            } else {
                dims.push(dimension(rng));
            }
            format!("'{name}' rank {}", dims.len())
        }
        _ => {
            info.name = [
                "image",
                "z",
                "class",
                "attention_0",
                "features",
                "logits",
                "",
                "a\nb",
            ]
            .choose(rng)
            .unwrap_or(&"")
            .to_string();
            format!("'{name}' renamed '{}'", info.name)
        }
    }
}

/// A structural edit of a model: its metadata, declared inputs and outputs, initializers,
/// nodes or opset; returned encoded.
fn structural(rng: &mut ChaCha8Rng, model: &ModelProto) -> (Vec<u8>, String) {
    let mut model = model.clone();
    let what = match rng.random_range(0..7) {
        0 | 1 => {
            let keys = [
                "sagan.z_dim",
                "sagan.channels",
                "sagan.image_size",
                "sagan.num_classes",
                "sagan.attention_outputs",
                "sagan.value_range",
                "sagan.input_range",
                "sagan.model",
                "sagan.step",
            ];
            let key = keys.choose(rng).unwrap_or(&"sagan.z_dim").to_string();
            let value = mutate::number_text(rng);
            model
                .metadata_props
                .retain(|p| p.key != key || rng.random_bool(0.3));
            model.metadata_props.push(StringStringEntryProto {
                key: key.clone(),
                value: value.clone(),
            });
            format!("metadata {key} = {value:?}")
        }
        2 | 3 => {
            let graph = model.graph.get_or_insert_with(Default::default);
            let outputs = rng.random_bool(0.5);
            let list = if outputs {
                &mut graph.output
            } else {
                &mut graph.input
            };
            match list.len() {
                0 => "no declared values".into(),
                n => {
                    let i = rng.random_range(0..n);
                    edit_value_info(rng, &mut list[i])
                }
            }
        }
        4 => {
            let graph = model.graph.get_or_insert_with(Default::default);
            match graph.initializer.len() {
                0 => "no initializer".into(),
                n => {
                    let t = &mut graph.initializer[rng.random_range(0..n)];
                    if !t.dims.is_empty() && rng.random_bool(0.6) {
                        let i = rng.random_range(0..t.dims.len());
                        t.dims[i] = mutate::interesting(rng) as i64;
                        format!("initializer '{}' dims {:?}", t.name, t.dims)
                    } else {
                        let donor = t.raw_data.clone();
                        let what = mutate::bytes(rng, &mut t.raw_data, &donor);
                        format!("initializer '{}' data: {what}", t.name)
                    }
                }
            }
        }
        5 => {
            let graph = model.graph.get_or_insert_with(Default::default);
            match graph.node.len() {
                0 => "no node".into(),
                n => {
                    let node = &mut graph.node[rng.random_range(0..n)];
                    match rng.random_range(0..3) {
                        0 => {
                            node.op_type = ["Reshape", "Tanh", "Loop", "Softmax", "", "Expand"]
                                .choose(rng)
                                .unwrap_or(&"")
                                .to_string();
                            format!("node op {}", node.op_type)
                        }
                        1 => {
                            node.input.pop();
                            format!("node '{}' loses an input", node.name)
                        }
                        _ => {
                            let i = graph.node.len() - 1;
                            let copy = graph.node[i].clone();
                            graph.node.push(copy);
                            "last node duplicated".into()
                        }
                    }
                }
            }
        }
        _ => {
            if rng.random_bool(0.5) {
                model.ir_version = mutate::interesting(rng) as i64;
                format!("ir_version {}", model.ir_version)
            } else {
                let v = *[0i64, 1, 7, 30, 1000, -1].choose(rng).unwrap_or(&0);
                for op in &mut model.opset_import {
                    op.version = v;
                }
                format!("opset {v}")
            }
        }
    };
    (model.encode_to_vec(), what)
}

/// A model to mutate: its bytes, decoded form, and what its loader is told.
struct Base<O> {
    bytes: Vec<u8>,
    model: ModelProto,
    options: O,
}

fn base<O>(rel: &str, options: O) -> Base<O> {
    let bytes = read(&fixture(rel));
    let model = ModelProto::decode(bytes.as_slice()).expect("a fixture model");
    Base {
        bytes,
        model,
        options,
    }
}

fn mutated<O>(rng: &mut ChaCha8Rng, bases: &[Base<O>]) -> (usize, Vec<u8>, String) {
    let i = rng.random_range(0..bases.len());
    let (bytes, what) = match rng.random_range(0..5) {
        0..=2 => structural(rng, &bases[i].model),
        _ => {
            let mut bytes = bases[i].bytes.clone();
            let donor = &bases[rng.random_range(0..bases.len())].bytes;
            let what = mutate::bytes(rng, &mut bytes, donor);
            (bytes, what)
        }
    };
    (i, bytes, what)
}

/// Generators as sagan-infer loads them, then one or two images generated from each that loads.
#[test]
fn onnx_generators() {
    let rt = runtime();
    let options = |z_dim| LoadOptions {
        threads: Some(1),
        z_dim,
        ..Default::default()
    };
    let bases = [
        base("onnx/tiny-generator.onnx", options(None)),
        base("onnx/tiny-generator-attention.onnx", options(None)),
        base("onnx/fixed-batch-generator.onnx", options(None)),
        base("onnx/plain-generator.onnx", options(Some(8))),
        // Without --z-dim: the z size can only come from metadata a mutation adds.
        base("onnx/plain-generator.onnx", options(None)),
        base("onnx/not-a-generator.onnx", options(None)),
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("model.onnx");
    Fuzz {
        name: "onnx-generator",
        slot: 7,
        cases: 4000,
    }
    .run(|rng| {
        let (i, bytes, what) = mutated(rng, &bases);
        write(&path, &bytes);
        let result = Generator::load(rt, &path, &bases[i].options).and_then(|mut g| {
            let z_dim = g.z_dim();
            assert!(z_dim <= MAX_Z, "loaded with z_dim {z_dim}");
            let n = rng.random_range(1..=2);
            let classes = (g.num_classes() > 0).then(|| vec![0i64; n]);
            g.generate(&vec![0.0; n * z_dim], classes.as_deref(), n)
        });
        (what, outcome(result, &path))
    })
    .assert_clean();
}

/// Feature networks as sagan-eval loads them, then run on a small batch of images.
#[test]
fn onnx_feature_nets() {
    let rt = runtime();
    let options = |features: &str| FeatureNetOptions {
        threads: Some(1),
        features_output: Some(features.to_string()),
        ..Default::default()
    };
    let bases = [
        base("fid/embedding-net.onnx", options("embedding")),
        base(
            "fid/embedding-net-batch4-range01.onnx",
            options("embedding"),
        ),
        base("mnist-classifier.onnx", options("features")),
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("features.onnx");
    let images = vec![0.25f32; 3 * 28 * 28];
    Fuzz {
        name: "onnx-feature-net",
        slot: 8,
        cases: 3000,
    }
    .run(|rng| {
        let (i, bytes, what) = mutated(rng, &bases);
        write(&path, &bytes);
        let result: Result<Outcome, _> =
            FeatureNet::load(rt, &path, &bases[i].options).map(|mut net| {
                let n = rng.random_range(1..=3);
                let batch = ImageBatch::new(&images[..n * 28 * 28], n, 1, 28, 28).expect("batch");
                outcome(net.run(&batch), &path)
            });
        let outcome = result.unwrap_or_else(|e| outcome(Err::<(), _>(e), &path));
        (what, outcome)
    })
    .assert_clean();
}
