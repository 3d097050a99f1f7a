//! Checkpoints (safetensors with sagan metadata) and presets (TOML).

use crate::harness::{Fuzz, Report};
use crate::{mutate, outcome, read, write};
use candle_core::Device;
use candle_nn::VarMap;
use rand::seq::IndexedRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use sagan::checkpoint::{self, Kind, Metadata};
use sagan::config::{ModelConfig, TrainConfig, BUILTIN_PRESETS};
use std::path::Path;

/// A generator small enough to write, mutate and load thousands of times, with attention and
/// batch norm so that every kind of tensor is in its checkpoint.
const TINY_PRESET: &str = r#"
name = "fuzz-tiny"
channels = 1
image_size = 8
z_dim = 8

[training]
steps = 10
batch_size = 4

[generator]
layers = [
  { type = "conv_transpose", out = 16, kernel = 4, batch_norm = true, act = "relu" },
  { type = "attention" },
  { type = "conv_transpose", out = 1, kernel = 4, stride = 2, padding = 1, act = "tanh" },
]

[discriminator]
layers = [
  { type = "conv", out = 8, kernel = 4, stride = 2, padding = 1, act = "leaky_relu" },
  { type = "conv", out = 1, kernel = 4 },
]
"#;

/// A valid generator checkpoint of the tiny preset, as `sagan-train` writes one.
fn tiny_checkpoint(dir: &Path) -> Vec<u8> {
    let model = ModelConfig::from_toml(TINY_PRESET).expect("the tiny preset");
    let varmap = VarMap::new();
    let vb = sagan::rng::seeded_var_builder(&varmap, sagan::rng::stream(7, 0), &Device::Cpu);
    sagan::model::Generator::new(vb, &model).expect("the tiny generator");
    let meta = Metadata {
        kind: Kind::Generator,
        train: TrainConfig::for_preset(&model),
        model,
        step: 5,
        run_id: Some("fuzz-run".into()),
    };
    let path = dir.join("base.safetensors");
    checkpoint::save(&path, &checkpoint::varmap_tensors(&varmap), &meta).expect("saving");
    read(&path)
}

/// Edits the safetensors header as JSON (a tensor's dtype, shape or offsets, a metadata entry,
/// or a field of the preset or training config stored in the metadata) and writes it back with
/// its length, so the file stays parseable as far as the edit allows.
fn header_edit(rng: &mut ChaCha8Rng, data: &mut Vec<u8>) -> String {
    let n = u64::from_le_bytes(data[..8].try_into().expect("8 bytes")) as usize;
    let mut header: serde_json::Value =
        serde_json::from_slice(&data[8..8 + n]).expect("the valid checkpoint's header");
    let what = match rng.random_range(0..5) {
        // A field of the stored preset or training config (a JSON string within the JSON).
        0 | 1 => {
            let key = if rng.random_bool(0.8) {
                "model"
            } else {
                "train"
            };
            let text = header["__metadata__"][key]
                .as_str()
                .unwrap_or("{}")
                .to_string();
            let mut inner: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let what = match rng.random_range(0..3) {
                // Sizes only, the edit most likely to pass validation and reach the model.
                0 => huge_size(rng, &mut inner),
                _ => mutate::json(rng, &mut inner),
            };
            header["__metadata__"][key] = serde_json::Value::String(inner.to_string());
            format!("metadata {key}: {what}")
        }
        // A tensor's declared shape or data offsets set to a boundary value.
        2 => {
            let names: Vec<String> = header
                .as_object()
                .map(|m| m.keys().filter(|k| *k != "__metadata__").cloned().collect())
                .unwrap_or_default();
            let Some(name) = names.choose(rng) else {
                return "no tensor to edit".into();
            };
            let field = if rng.random_bool(0.5) {
                "shape"
            } else {
                "data_offsets"
            };
            let len = header[name][field].as_array().map_or(0, Vec::len);
            if len == 0 {
                return format!("{name} has no {field}");
            }
            let i = rng.random_range(0..len);
            let v = mutate::interesting(rng);
            header[name][field][i] = serde_json::json!(v);
            format!("{name}.{field}[{i}] = {v}")
        }
        _ => mutate::json(rng, &mut header),
    };
    let json = header.to_string().into_bytes();
    let tail = data[8 + n..].to_vec();
    data.clear();
    data.extend_from_slice(&(json.len() as u64).to_le_bytes());
    data.extend_from_slice(&json);
    data.extend_from_slice(&tail);
    what
}

/// Sets one size in a stored preset (an `out`, `z_dim`, `image_size`, ...) to a large value
/// that validation may still accept: the loader must not build what it declares.
fn huge_size(rng: &mut ChaCha8Rng, preset: &mut serde_json::Value) -> String {
    let v = *[1usize << 12, 1 << 16, 1 << 20, 1 << 24]
        .choose(rng)
        .unwrap_or(&(1 << 20));
    let layers = |net: &str| preset[net]["layers"].as_array().map_or(0, Vec::len);
    match rng.random_range(0..3) {
        0 => {
            let key = *["z_dim", "image_size", "num_classes"]
                .choose(rng)
                .unwrap_or(&"z_dim");
            preset[key] = serde_json::json!(v);
            format!("{key} = {v}")
        }
        _ => {
            let net = if rng.random_bool(0.7) {
                "generator"
            } else {
                "discriminator"
            };
            let n = layers(net);
            if n == 0 {
                return format!("{net} has no layers");
            }
            let i = rng.random_range(0..n);
            let layer = &mut preset[net]["layers"][i];
            if layer.get("out").is_none() {
                return format!("{net} layer {i} has no out");
            }
            layer["out"] = serde_json::json!(v);
            format!("{net} layer {i} out = {v}")
        }
    }
}

/// Which checkpoint loader a run fuzzes.
#[derive(Clone, Copy)]
enum Loader {
    Load,
    ReadMetadata,
    Generator,
}

fn fuzz_checkpoint(loader: Loader, slot: usize, name: &'static str, cases: u64) -> Report {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = tiny_checkpoint(dir.path());
    let step = dir.path().join("step-00000005");
    std::fs::create_dir(&step).expect("step dir");
    let generator = step.join(Kind::Generator.file_name());
    let ema = step.join(Kind::GeneratorEma.file_name());
    Fuzz { name, slot, cases }.run(|rng| {
        let mut data = base.clone();
        let what = match rng.random_range(0..2) {
            0 => header_edit(rng, &mut data),
            _ => mutate::bytes(rng, &mut data, &base),
        };
        // Mostly the file itself is mutated; sometimes a sibling of the same step, which the
        // generator loader checks belongs with it.
        let sibling = matches!(loader, Loader::Generator) && rng.random_bool(0.2);
        let path = if sibling {
            write(&generator, &base);
            &ema
        } else {
            let _ = std::fs::remove_file(&ema);
            &generator
        };
        write(path, &data);
        let result = match loader {
            Loader::Load => checkpoint::load(&generator, &Device::Cpu).map(|_| ()),
            Loader::ReadMetadata => checkpoint::read_metadata(&generator).map(|_| ()),
            Loader::Generator => {
                sagan::export::load_generator(&generator, &Device::Cpu).map(|_| ())
            }
        };
        (what, outcome(result, path))
    })
}

#[test]
fn checkpoint_load() {
    fuzz_checkpoint(Loader::Load, 3, "checkpoint-load", 5000).assert_clean();
}

#[test]
fn checkpoint_read_metadata() {
    fuzz_checkpoint(Loader::ReadMetadata, 4, "checkpoint-read-metadata", 5000).assert_clean();
}

#[test]
fn checkpoint_load_generator() {
    fuzz_checkpoint(Loader::Generator, 5, "export-load-generator", 5000).assert_clean();
}

/// Replaces one number of a TOML text with a boundary value (`0`, `-1`, huge, a float, junk).
fn toml_number(rng: &mut ChaCha8Rng, text: &str) -> String {
    let bytes = text.as_bytes();
    // Starts of numbers that follow "= " (values, not digits inside names or comments).
    let starts: Vec<usize> = (2..bytes.len())
        .filter(|&i| bytes[i].is_ascii_digit() && &bytes[i - 2..i] == b"= ")
        .collect();
    let Some(&start) = starts.choose(rng) else {
        return text.to_string();
    };
    let end = (start..bytes.len())
        .find(|&i| !(bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'.' | b'-' | b'+')))
        .unwrap_or(bytes.len());
    let new = match rng.random_range(0..3) {
        0 => ["0", "-1", "1"].choose(rng).unwrap_or(&"0").to_string(),
        1 => [
            "1048576",
            "1048577",
            "4096",
            "4097",
            "16",
            "100000000",
            "1e9",
            "1e400",
            "nan",
            "-inf",
        ]
        .choose(rng)
        .unwrap_or(&"0")
        .to_string(),
        _ => mutate::number_text(rng),
    };
    format!("{}{new}{}", &text[..start], &text[end..])
}

/// The presets: the built-in ones and the tiny one, mutated as bytes, as numbers in the text,
/// and as TOML values (a leaf replaced, a key dropped, a layer duplicated).
#[test]
fn presets() {
    let texts: Vec<&str> = BUILTIN_PRESETS
        .iter()
        .map(|(_, text)| *text)
        .chain([TINY_PRESET])
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("preset.toml");
    let path_str = path.to_str().expect("a UTF-8 temp path").to_string();
    Fuzz {
        name: "preset-toml",
        slot: 6,
        cases: 10000,
    }
    .run(|rng| {
        let text = *texts.choose(rng).expect("presets");
        let donor = *texts.choose(rng).expect("presets");
        let (bytes, what) = match rng.random_range(0..3) {
            0 => {
                let mut bytes = text.as_bytes().to_vec();
                let what = mutate::bytes(rng, &mut bytes, donor.as_bytes());
                (bytes, what)
            }
            1 => {
                let mut text = text.to_string();
                let rounds = rng.random_range(1..=3);
                for _ in 0..rounds {
                    text = toml_number(rng, &text);
                }
                (text.into_bytes(), format!("{rounds} numbers replaced"))
            }
            _ => {
                let table: toml::Table = toml::from_str(text).expect("a valid preset");
                let mut value = serde_json::to_value(&table).expect("TOML as JSON");
                let what = mutate::json(rng, &mut value);
                // JSON's null and integers past i64 have no TOML form: such an edit is dropped.
                match toml::to_string(&value) {
                    Ok(text) => (text.into_bytes(), what),
                    Err(_) => (
                        text.as_bytes().to_vec(),
                        format!("{what} (not TOML, dropped)"),
                    ),
                }
            }
        };
        write(&path, &bytes);
        // from_toml's errors name no file, but must be one line too: the harness sees them
        // with the file put in front.
        let from_text = std::str::from_utf8(&bytes).map(ModelConfig::from_toml);
        if let Ok(Err(e)) = from_text {
            if e.to_string().contains('\n') {
                return (
                    what,
                    outcome(Err::<(), _>(format!("{path_str}: from_toml: {e}")), &path),
                );
            }
        }
        (what, outcome(ModelConfig::resolve(&path_str), &path))
    })
    .assert_clean();
}
