//! Reading a frame tagged by its `"type"` field without buffering it first.
//!
//! serde reads an internally tagged enum (`#[serde(tag = "type")]`) by buffering every field
//! of the object into an intermediate tree, since the tag may come anywhere, and only then
//! reading the variant from the tree: twice the work, and an allocation per frame. Every
//! frame Courier and its SDKs write has `"type"` first, so a frame is read here in one pass
//! when it does: the tag, then the rest of the object straight into the variant's struct. A
//! frame with the tag further on (allowed: JSON objects are unordered) is buffered, as the
//! JSON text of each field, and then read in one pass with its tag first: so it reads the
//! same, even a field the frame has not (skipped unread either way, where a buffer of parsed
//! values refused what it could not hold, such as a lone surrogate or a number beyond f64).

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;
use std::marker::PhantomData;

/// The field naming a frame's variant.
const TAG: &str = "type";

/// A frame enum read by [`deserialize`]: its tags, and each tag's variant read from the
/// object's other fields.
pub(crate) trait TaggedFrame<'de>: Sized {
    /// The values of `"type"`, as a field-less enum.
    type Tag: Deserialize<'de>;
    /// What the error names when the input is not a frame.
    const EXPECTING: &'static str;

    /// The variant `tag` names, read from the fields after the tag (or all but the tag).
    fn variant<D: Deserializer<'de>>(tag: Self::Tag, fields: D) -> Result<Self, D::Error>;
}

/// Reads the frame `T` from `deserializer`: in one pass when `"type"` is its first field.
pub(crate) fn deserialize<'de, T, D>(deserializer: D) -> Result<T, D::Error>
where
    T: TaggedFrame<'de> + DeserializeOwned,
    D: Deserializer<'de>,
{
    deserializer.deserialize_map(FrameVisitor(PhantomData))
}

struct FrameVisitor<T>(PhantomData<T>);

impl<'de, T: TaggedFrame<'de> + DeserializeOwned> Visitor<'de> for FrameVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let Some(first) = map.next_key_seed(KeyUnlessTag)? else {
            return Err(de::Error::missing_field(TAG));
        };
        let Some(first) = first else {
            let tag = map.next_value()?;
            return T::variant(tag, de::value::MapAccessDeserializer::new(map));
        };
        // The tag further on: the fields are buffered as written until it is found, then
        // read as above from the object written again with the tag first.
        let mut fields = vec![(first, map.next_value::<Box<RawValue>>()?)];
        let mut tag = None;
        while let Some(key) = map.next_key_seed(KeyUnlessTag)? {
            match key {
                None if tag.is_some() => return Err(de::Error::duplicate_field(TAG)),
                None => tag = Some(map.next_value::<Box<RawValue>>()?),
                Some(key) => fields.push((key, map.next_value()?)),
            }
        }
        let tag = tag.ok_or_else(|| de::Error::missing_field(TAG))?;
        let mut json = format!(r#"{{"{TAG}":{}"#, tag.get());
        for (key, value) in &fields {
            json.push(',');
            json.push_str(&serde_json::Value::from(key.as_str()).to_string());
            json.push(':');
            json.push_str(value.get());
        }
        json.push('}');
        serde_json::from_str(&json).map_err(|e| {
            // The place in the text written here means nothing to the sender.
            let message = e.to_string();
            let place = format!(" at line {} column {}", e.line(), e.column());
            de::Error::custom(message.strip_suffix(&place).unwrap_or(&message))
        })
    }
}

/// Reads a field's name: `None` for the tag, the name otherwise.
struct KeyUnlessTag;

impl<'de> DeserializeSeed<'de> for KeyUnlessTag {
    type Value = Option<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for KeyUnlessTag {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok((key != TAG).then(|| key.to_owned()))
    }
}
