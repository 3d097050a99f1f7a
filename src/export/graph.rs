//! A small builder over candle-onnx's protobuf types: named tensors with known shapes,
//! initializers and nodes, assembled into an opset-17 model.

use candle_onnx::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use std::collections::HashMap;

pub const OPSET: i64 = 17;
pub const IR_VERSION: i64 = 8;
/// The symbolic batch dimension's name.
pub const BATCH: &str = "batch";

/// A dimension of a value's shape: the symbolic batch or a fixed size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    Batch,
    Fixed(usize),
}

/// The shape of a batched value: batch first, then fixed dimensions.
pub fn batched(rest: &[usize]) -> Vec<Dim> {
    std::iter::once(Dim::Batch)
        .chain(rest.iter().map(|&d| Dim::Fixed(d)))
        .collect()
}

pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

pub fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

pub fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: value,
        ..Default::default()
    }
}

pub fn attr_string(name: &str, value: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: value.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn value_info(name: &str, elem_type: DataType, shape: &[Dim]) -> ValueInfoProto {
    let dim = shape
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Batch => tensor_shape_proto::dimension::Value::DimParam(BATCH.into()),
                Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(*n as i64),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem_type as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The static shape of a value recorded in a model's value_info (batch as `Dim::Batch`).
pub fn shape_of(graph: &GraphProto, name: &str) -> Option<Vec<Dim>> {
    let info = graph
        .value_info
        .iter()
        .chain(&graph.input)
        .chain(&graph.output)
        .find(|v| v.name == name)?;
    let Some(type_proto::Value::TensorType(t)) = info.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    t.shape
        .as_ref()?
        .dim
        .iter()
        .map(|d| match d.value.as_ref()? {
            tensor_shape_proto::dimension::Value::DimParam(_) => Some(Dim::Batch),
            tensor_shape_proto::dimension::Value::DimValue(n) => Some(Dim::Fixed(*n as usize)),
        })
        .collect()
}

pub fn float_tensor(name: &str, dims: &[usize], data: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

pub fn int64_tensor(name: &str, data: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: vec![data.len() as i64],
        data_type: DataType::Int64 as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// Accumulates a graph. Intermediate values get their shapes recorded as value_info, so that
/// later rewrites (and readers such as TensorRT) know every static dimension.
#[derive(Default)]
pub struct GraphBuilder {
    graph: GraphProto,
    shapes: HashMap<String, Vec<Dim>>,
    counter: usize,
    /// Prefix of fresh names, so that a rewrite of an existing graph cannot collide with it.
    namespace: String,
}

impl GraphBuilder {
    /// Continues `graph`; fresh names start with `namespace`.
    pub fn from_graph(graph: GraphProto, namespace: &str) -> Self {
        Self {
            graph,
            namespace: namespace.into(),
            ..Default::default()
        }
    }

    /// A fresh value name with a readable prefix.
    pub fn fresh(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{}{prefix}_{}", self.namespace, self.counter)
    }

    /// Appends an existing node unchanged.
    pub fn push_node(&mut self, node: NodeProto) {
        self.graph.node.push(node);
    }

    pub fn input(&mut self, name: &str, elem_type: DataType, shape: Vec<Dim>) {
        self.graph.input.push(value_info(name, elem_type, &shape));
        self.shapes.insert(name.into(), shape);
    }

    pub fn output(&mut self, name: &str, shape: Vec<Dim>) {
        self.graph
            .output
            .push(value_info(name, DataType::Float, &shape));
    }

    pub fn initializer(&mut self, tensor: TensorProto) -> String {
        let name = tensor.name.clone();
        self.graph.initializer.push(tensor);
        name
    }

    pub fn float_const(&mut self, prefix: &str, dims: &[usize], data: &[f32]) -> String {
        let name = self.fresh(prefix);
        self.initializer(float_tensor(&name, dims, data))
    }

    pub fn int64_const(&mut self, prefix: &str, data: &[i64]) -> String {
        let name = self.fresh(prefix);
        self.initializer(int64_tensor(&name, data))
    }

    /// Adds a node with one float output of `shape`, returning the output's name.
    pub fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        shape: Vec<Dim>,
    ) -> String {
        let output = self.fresh(&op.to_lowercase());
        self.node_named(op, inputs, attributes, &output, shape);
        output
    }

    /// Like [`node`](Self::node) with a chosen output name.
    pub fn node_named(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        output: &str,
        shape: Vec<Dim>,
    ) {
        let name = self.fresh(op);
        self.graph.node.push(NodeProto {
            name,
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            attribute: attributes,
            ..Default::default()
        });
        self.graph
            .value_info
            .push(value_info(output, DataType::Float, &shape));
        self.shapes.insert(output.into(), shape);
    }

    /// Renames the value `from` (already produced by a node) to `to`, e.g. a graph output.
    pub fn rename(&mut self, from: &str, to: &str) {
        for node in &mut self.graph.node {
            for name in node.output.iter_mut().chain(node.input.iter_mut()) {
                if name == from {
                    *name = to.to_string();
                }
            }
        }
        self.graph.value_info.retain(|v| v.name != from);
        if let Some(shape) = self.shapes.remove(from) {
            self.shapes.insert(to.into(), shape);
        }
    }

    /// The shape of a value this builder made, or one recorded in the graph it continues.
    pub fn shape(&self, name: &str) -> Option<Vec<Dim>> {
        self.shapes
            .get(name)
            .cloned()
            .or_else(|| shape_of(&self.graph, name))
    }

    pub fn initializer_named(&self, name: &str) -> Option<&TensorProto> {
        self.graph.initializer.iter().find(|t| t.name == name)
    }

    pub fn into_graph(self) -> GraphProto {
        self.graph
    }

    pub fn into_model(self, name: &str, metadata: Vec<(String, String)>) -> ModelProto {
        let mut graph = self.graph;
        graph.name = name.into();
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "sagan".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(graph),
            metadata_props: metadata
                .into_iter()
                .map(|(key, value)| StringStringEntryProto { key, value })
                .collect(),
            ..Default::default()
        }
    }
}
