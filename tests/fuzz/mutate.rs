//! Mutations: byte-level ones that know nothing of the format (truncate, flip bits, splice in
//! chunks from elsewhere, duplicate, delete, write boundary integers), and helpers for the
//! structural ones each loader's test makes on its own format.

use rand::seq::IndexedRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Integers at the edges: zero, one, sign bits, type maxima, and sizes too large to allocate.
pub const INTERESTING: [u64; 16] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1_000_000_000,
    1 << 40,
    i64::MAX as u64,
    1 << 63,
    u64::MAX,
];

pub fn interesting(rng: &mut ChaCha8Rng) -> u64 {
    *INTERESTING.choose(rng).unwrap_or(&0)
}

/// A random range of `len` bytes: (start, end).
fn range(rng: &mut ChaCha8Rng, len: usize) -> (usize, usize) {
    let start = rng.random_range(0..=len);
    let max = (len - start).min(256);
    (start, start + rng.random_range(0..=max))
}

/// One to three stacked byte-level mutations of `data`; `donor` is where splices come from
/// (another valid file of the format, or `data` itself). Returns what was done.
pub fn bytes(rng: &mut ChaCha8Rng, data: &mut Vec<u8>, donor: &[u8]) -> String {
    let rounds = rng.random_range(1..=3);
    let done: Vec<String> = (0..rounds).map(|_| one(rng, data, donor)).collect();
    done.join(", ")
}

fn one(rng: &mut ChaCha8Rng, data: &mut Vec<u8>, donor: &[u8]) -> String {
    let len = data.len();
    match rng.random_range(0..9) {
        0 => {
            let at = rng.random_range(0..=len);
            data.truncate(at);
            format!("truncate to {at}")
        }
        1 if len > 0 => {
            let flips = rng.random_range(1..=8);
            for _ in 0..flips {
                let bit = rng.random_range(0..len * 8);
                data[bit / 8] ^= 1 << (bit % 8);
            }
            format!("flip {flips} bits")
        }
        2 if len > 0 => {
            let at = rng.random_range(0..len);
            data[at] = *[0u8, 0xff, 0x7f, 0x80, b'\n', b'"', b'9']
                .choose(rng)
                .unwrap_or(&0);
            format!("byte {at} = {}", data[at])
        }
        3 if !donor.is_empty() => {
            let (from, to) = range(rng, donor.len());
            let at = rng.random_range(0..=len);
            let chunk = &donor[from..to];
            if rng.random_bool(0.5) {
                data.splice(at..at, chunk.iter().copied());
                format!("insert donor {from}..{to} at {at}")
            } else {
                let end = (at + chunk.len()).min(len);
                data.splice(at..end, chunk.iter().copied());
                format!("overwrite {at}..{end} with donor {from}..{to}")
            }
        }
        4 => {
            let (from, to) = range(rng, len);
            let chunk = data[from..to].to_vec();
            data.splice(to..to, chunk);
            format!("duplicate {from}..{to}")
        }
        5 => {
            let (from, to) = range(rng, len);
            data.drain(from..to);
            format!("delete {from}..{to}")
        }
        6 => {
            let at = rng.random_range(0..=len);
            let n = rng.random_range(1..=32);
            let random: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            data.splice(at..at, random);
            format!("insert {n} random bytes at {at}")
        }
        7 if len >= 8 => {
            let width = *[1usize, 2, 4, 8].choose(rng).unwrap_or(&4);
            let at = rng.random_range(0..=len - width);
            let v = interesting(rng);
            let big = rng.random_bool(0.5);
            let le = v.to_le_bytes();
            let be = v.to_be_bytes();
            let field = if big { &be[8 - width..] } else { &le[..width] };
            data[at..at + width].copy_from_slice(field);
            format!(
                "{width}-byte {} {v} at {at}",
                if big { "big-endian" } else { "little-endian" }
            )
        }
        _ => {
            // Everything from a random point on comes from the donor.
            let at = rng.random_range(0..=len);
            let from = rng.random_range(0..=donor.len());
            data.truncate(at);
            data.extend_from_slice(&donor[from..]);
            format!("tail from donor {from} at {at}")
        }
    }
}

/// A number as a text field might hold it: boundary integers, negatives, floats, junk.
pub fn number_text(rng: &mut ChaCha8Rng) -> String {
    match rng.random_range(0..4) {
        0 => interesting(rng).to_string(),
        1 => format!("-{}", interesting(rng)),
        2 => ["0.5", "1e300", "-1e-300", "NaN", "inf", "1e9"]
            .choose(rng)
            .unwrap_or(&"0")
            .to_string(),
        _ => ["", " ", "abc", "1\n2", "\"", "{}", "0x10"]
            .choose(rng)
            .unwrap_or(&"")
            .to_string(),
    }
}

/// A replacement for a JSON value: boundary numbers, other types, odd strings.
pub fn json_value(rng: &mut ChaCha8Rng) -> serde_json::Value {
    use serde_json::{json, Value};
    match rng.random_range(0..6) {
        0 => json!(interesting(rng)),
        1 => json!(-(interesting(rng) as i64).abs().max(1)),
        2 => json!(*[0.0, -1.0, 0.5, 1e300, -1e300].choose(rng).unwrap_or(&0.0)),
        3 => Value::String(number_text(rng)),
        4 => [Value::Null, json!(true), json!([]), json!({})]
            .choose(rng)
            .cloned()
            .unwrap_or(Value::Null),
        _ => Value::String(
            ["", "generator", "x\ny", "conv", "../../x", "F16", "U8"]
                .choose(rng)
                .unwrap_or(&"")
                .to_string(),
        ),
    }
}

/// Replaces one random leaf (or drops one random key) of `value`; says which.
pub fn json(rng: &mut ChaCha8Rng, value: &mut serde_json::Value) -> String {
    use serde_json::Value;
    // Collect the paths of all nodes, pick one.
    fn paths(v: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        out.push(at.clone());
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    at.push(k.clone());
                    paths(v, at, out);
                    at.pop();
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    at.push(i.to_string());
                    paths(v, at, out);
                    at.pop();
                }
            }
            _ => {}
        }
    }
    let mut all = Vec::new();
    paths(value, &mut Vec::new(), &mut all);
    let Some(path) = all.choose(rng).cloned() else {
        return "nothing".into();
    };
    let (parent_path, last) = match path.split_last() {
        Some((last, parent)) => (parent.to_vec(), Some(last.clone())),
        None => (Vec::new(), None),
    };
    let mut parent = &mut *value;
    for key in &parent_path {
        parent = match parent {
            Value::Object(map) => map.get_mut(key).expect("path from the walk"),
            Value::Array(items) => &mut items[key.parse::<usize>().expect("index")],
            _ => unreachable!("paths only go through containers"),
        };
    }
    let shown = path.join(".");
    match (parent, last) {
        (Value::Object(map), Some(key)) if rng.random_bool(0.15) => {
            map.remove(&key);
            format!("drop {shown}")
        }
        (Value::Array(items), Some(i)) if rng.random_bool(0.15) => {
            let i: usize = i.parse().expect("index");
            let copy = items[i].clone();
            items.insert(i, copy);
            format!("duplicate {shown}")
        }
        (Value::Object(map), Some(key)) => {
            let new = json_value(rng);
            let shown = format!("{shown} = {new}");
            map.insert(key, new);
            shown
        }
        (Value::Array(items), Some(i)) => {
            let new = json_value(rng);
            let shown = format!("{shown} = {new}");
            items[i.parse::<usize>().expect("index")] = new;
            shown
        }
        (root, _) => {
            *root = json_value(rng);
            format!("root = {root}")
        }
    }
}
