//! The `sagan.*` metadata_props sagan-export writes into the ONNX file. They are what makes an
//! export self-describing: the z size, the picture shape, how many attention outputs.

use std::collections::BTreeMap;

/// Metadata of a sagan export. Every field is optional here; [`crate::infer::Generator`]
/// decides which ones it needs (a plain generator has none).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SaganMetadata {
    pub preset: Option<String>,
    /// The model config, as sagan-export wrote it.
    pub model: Option<serde_json::Value>,
    pub step: Option<u64>,
    pub z_dim: Option<usize>,
    pub channels: Option<usize>,
    pub image_size: Option<usize>,
    /// Classes of a class-conditional model (0: unconditional).
    pub num_classes: Option<usize>,
    pub attention_outputs: Option<usize>,
    pub producer: Option<String>,
}

impl SaganMetadata {
    /// Parses the model's custom metadata; a `sagan.*` key with a malformed value is an error
    /// naming the key and value (a hand-edited or foreign file should not be half-trusted).
    pub fn parse(props: &BTreeMap<String, String>) -> Result<Self, String> {
        fn number<T: std::str::FromStr>(
            props: &BTreeMap<String, String>,
            key: &str,
        ) -> Result<Option<T>, String> {
            props
                .get(key)
                .map(|v| {
                    v.trim().parse::<T>().map_err(|_| {
                        format!("metadata '{key}' is '{v}', not a non-negative integer")
                    })
                })
                .transpose()
        }
        let positive = |key: &str| -> Result<Option<usize>, String> {
            match number::<usize>(props, key)? {
                Some(0) => Err(format!("metadata '{key}' is 0")),
                v => Ok(v),
            }
        };
        if let Some(range) = props.get("sagan.value_range") {
            let parsed: Vec<f32> = range
                .split(',')
                .filter_map(|v| v.trim().parse().ok())
                .collect();
            if parsed != [-1.0, 1.0] {
                return Err(format!(
                    "metadata 'sagan.value_range' is '{range}'; only '-1,1' is supported"
                ));
            }
        }
        let model = props
            .get("sagan.model")
            .map(|json| {
                serde_json::from_str(json)
                    .map_err(|e| format!("metadata 'sagan.model' is not valid JSON: {e}"))
            })
            .transpose()?;
        Ok(Self {
            preset: props.get("sagan.preset").cloned(),
            model,
            step: number(props, "sagan.step")?,
            z_dim: positive("sagan.z_dim")?,
            channels: positive("sagan.channels")?,
            image_size: positive("sagan.image_size")?,
            num_classes: number(props, "sagan.num_classes")?,
            attention_outputs: number(props, "sagan.attention_outputs")?,
            producer: props.get("producer").cloned(),
        })
    }

    /// True when the file carries any sagan metadata at all, i.e. came from sagan-export.
    pub fn is_sagan_export(&self) -> bool {
        self.z_dim.is_some() || self.preset.is_some() || self.model.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_a_full_export() {
        let meta = SaganMetadata::parse(&props(&[
            ("sagan.preset", "mnist28"),
            ("sagan.model", r#"{"z_dim": 128, "channels": 1}"#),
            ("sagan.step", "5000"),
            ("sagan.z_dim", "128"),
            ("sagan.channels", "1"),
            ("sagan.image_size", "28"),
            ("sagan.value_range", "-1,1"),
            ("sagan.attention_outputs", "2"),
            ("producer", "sagan 0.1.0"),
        ]))
        .unwrap();
        assert_eq!(meta.preset.as_deref(), Some("mnist28"));
        assert_eq!(meta.model.as_ref().unwrap()["z_dim"], 128);
        assert_eq!(meta.step, Some(5000));
        assert_eq!(meta.z_dim, Some(128));
        assert_eq!(meta.channels, Some(1));
        assert_eq!(meta.image_size, Some(28));
        assert_eq!(meta.attention_outputs, Some(2));
        assert_eq!(meta.producer.as_deref(), Some("sagan 0.1.0"));
        assert!(meta.is_sagan_export());
    }

    #[test]
    fn no_metadata_is_a_plain_model() {
        let meta = SaganMetadata::parse(&props(&[("producer", "pytorch")])).unwrap();
        assert!(!meta.is_sagan_export());
        assert_eq!(meta.z_dim, None);
    }

    #[test]
    fn malformed_values_name_the_key() {
        for (key, value, needle) in [
            ("sagan.z_dim", "abc", "'sagan.z_dim' is 'abc'"),
            ("sagan.z_dim", "0", "'sagan.z_dim' is 0"),
            ("sagan.step", "-3", "'sagan.step' is '-3'"),
            ("sagan.value_range", "0,1", "only '-1,1'"),
            ("sagan.model", "{oops", "'sagan.model' is not valid JSON"),
        ] {
            let err = SaganMetadata::parse(&props(&[(key, value)])).unwrap_err();
            assert!(err.contains(needle), "{key}={value}: {err}");
        }
    }
}
