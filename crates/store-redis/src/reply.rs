//! Decoding script replies (see `scripts.rs`) into store outcomes, without
//! trusting them: a reply of the wrong shape or a field that does not parse
//! is `StoreError::Corrupt`, never a panic.

use std::collections::VecDeque;
use std::str::FromStr;

use redis::Value;

use numstream_store::StoreError;

/// A script's status word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Ok,
    Exists,
    Full,
    NotFound,
    BadToken,
    Superseded,
    Corrupt,
}

/// A decoded reply: the status and the values that follow it, in order.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: Status,
    values: VecDeque<Value>,
}

pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

impl Reply {
    pub(crate) fn decode(value: Value) -> Result<Self, StoreError> {
        let mut values = match value {
            Value::Array(values) => VecDeque::from(values),
            other => return Err(corrupt(format!("script replied {}", kind(&other)))),
        };
        let word = values
            .pop_front()
            .ok_or_else(|| corrupt("script replied an empty array"))?;
        let status = match bytes(word, "status")?.as_slice() {
            b"ok" => Status::Ok,
            b"exists" => Status::Exists,
            b"full" => Status::Full,
            b"not_found" => Status::NotFound,
            b"bad_token" => Status::BadToken,
            b"superseded" => Status::Superseded,
            b"corrupt" => Status::Corrupt,
            other => {
                return Err(corrupt(format!(
                    "unknown script status {:?}",
                    String::from_utf8_lossy(other)
                )));
            }
        };
        let mut reply = Self { status, values };
        if reply.status == Status::Corrupt {
            let why = reply.string("reason")?;
            return Err(corrupt(why));
        }
        Ok(reply)
    }

    /// Maps the statuses every fenced operation shares; `Ok` is left to the
    /// caller, which knows what follows it.
    pub(crate) fn expect_ok(mut self) -> Result<Self, StoreError> {
        match self.status {
            Status::Ok => Ok(self),
            Status::NotFound => Err(StoreError::NotFound),
            Status::Exists => Err(StoreError::AlreadyExists),
            Status::Full => Err(StoreError::Full {
                max: self.number("bound")?,
            }),
            Status::BadToken => Err(StoreError::BadToken),
            Status::Superseded => Err(StoreError::Superseded {
                current: self.number("current generation")?,
            }),
            // `decode` already turned this one into an error.
            Status::Corrupt => Err(corrupt("corrupt record")),
        }
    }

    fn next(&mut self, what: &str) -> Result<Value, StoreError> {
        self.values
            .pop_front()
            .ok_or_else(|| corrupt(format!("script reply lacks {what}")))
    }

    pub(crate) fn bytes(&mut self, what: &str) -> Result<Vec<u8>, StoreError> {
        let value = self.next(what)?;
        bytes(value, what)
    }

    pub(crate) fn string(&mut self, what: &str) -> Result<String, StoreError> {
        String::from_utf8(self.bytes(what)?).map_err(|_| corrupt(format!("{what} is not UTF-8")))
    }

    /// A number sent as an integer reply or as the decimal string stored in
    /// the hash.
    pub(crate) fn number<T>(&mut self, what: &str) -> Result<T, StoreError>
    where
        T: FromStr + TryFrom<i64>,
    {
        match self.next(what)? {
            Value::Int(number) => {
                T::try_from(number).map_err(|_| corrupt(format!("{what} {number} is out of range")))
            }
            other => {
                let text = bytes(other, what)?;
                std::str::from_utf8(&text)
                    .ok()
                    .and_then(|text| text.parse().ok())
                    .ok_or_else(|| {
                        corrupt(format!(
                            "{what} {:?} is not a valid number",
                            String::from_utf8_lossy(&text)
                        ))
                    })
            }
        }
    }

    /// A session's count: a number of 1 to 65,535. A record that says 0
    /// (no script writes one) would have no last index, so it is corrupt
    /// rather than passed on to a server that computes `count - 1`.
    pub(crate) fn count(&mut self) -> Result<u16, StoreError> {
        match self.number("count")? {
            0 => Err(corrupt("count is 0: a session has at least one number")),
            count => Ok(count),
        }
    }

    /// [`number`](Self::number), or `None` for the empty string a script
    /// sends for a field the record does not have.
    pub(crate) fn optional_number<T>(&mut self, what: &str) -> Result<Option<T>, StoreError>
    where
        T: FromStr + TryFrom<i64>,
    {
        let absent = matches!(
            self.values.front(),
            Some(Value::BulkString(text)) if text.is_empty()
        );
        if absent {
            self.next(what)?;
            return Ok(None);
        }
        self.number(what).map(Some)
    }
}

/// One session's answer in a `RENEW_MANY` reply: the plain string `ok`
/// for a renewed lease, else a refusal shaped like RENEW's reply.
pub(crate) fn renewal(value: Value) -> Result<(), StoreError> {
    match &value {
        Value::BulkString(word) if word.as_slice() == b"ok" => Ok(()),
        Value::SimpleString(word) if word == "ok" => Ok(()),
        _ => Reply::decode(value)?.expect_ok().map(drop),
    }
}

fn bytes(value: Value, what: &str) -> Result<Vec<u8>, StoreError> {
    match value {
        Value::BulkString(bytes) => Ok(bytes),
        Value::SimpleString(text) => Ok(text.into_bytes()),
        other => Err(corrupt(format!("{what} is {}", kind(&other)))),
    }
}

/// Names a value's type without its contents (which may hold a seed).
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Nil => "nil",
        Value::Int(_) => "an integer",
        Value::BulkString(_) | Value::SimpleString(_) | Value::VerbatimString { .. } => "a string",
        Value::Okay => "OK",
        Value::Array(_) | Value::Set(_) => "an array",
        Value::Map(_) | Value::Attribute { .. } => "a map",
        Value::Double(_) | Value::BigNumber(_) => "a non-integer number",
        Value::Boolean(_) => "a boolean",
        _ => "an unexpected value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn array(values: Vec<Value>) -> Value {
        Value::Array(values)
    }

    fn text(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn superseded_carries_the_current_generation() {
        let reply = Reply::decode(array(vec![text("superseded"), text("7")])).expect("decode");
        assert_eq!(
            reply.expect_ok().err(),
            Some(StoreError::Superseded { current: 7 })
        );
    }

    #[test]
    fn full_carries_the_bound() {
        let reply = Reply::decode(array(vec![text("full"), text("1000")])).expect("decode");
        assert_eq!(
            reply.expect_ok().err(),
            Some(StoreError::Full { max: 1000 })
        );
    }

    #[test]
    fn an_empty_optional_number_is_absent_not_zero() {
        let mut reply =
            Reply::decode(array(vec![text("ok"), text(""), text("7"), text("x")])).expect("ok");
        assert_eq!(reply.optional_number::<u32>("absent"), Ok(None));
        assert_eq!(reply.optional_number::<u32>("present"), Ok(Some(7)));
        assert!(matches!(
            reply.optional_number::<u32>("garbage"),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            reply.optional_number::<u32>("missing"),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn numbers_come_as_integers_or_decimal_strings() {
        let mut reply =
            Reply::decode(array(vec![text("ok"), Value::Int(3), text("42")])).expect("decode");
        assert_eq!(reply.number::<u64>("a"), Ok(3));
        assert_eq!(reply.number::<u16>("b"), Ok(42));
    }

    #[test]
    fn a_count_of_zero_is_corrupt() {
        let mut reply = Reply::decode(array(vec![text("ok"), text("0"), Value::Int(0), text("7")]))
            .expect("decode");
        assert!(matches!(reply.count(), Err(StoreError::Corrupt(_))));
        assert!(matches!(reply.count(), Err(StoreError::Corrupt(_))));
        assert_eq!(reply.count(), Ok(7));
    }

    #[test]
    fn a_renewal_is_ok_as_a_plain_word_and_refused_as_an_array() {
        assert_eq!(renewal(text("ok")), Ok(()));
        assert_eq!(renewal(Value::SimpleString("ok".to_owned())), Ok(()));
        assert_eq!(
            renewal(array(vec![text("superseded"), text("9")])),
            Err(StoreError::Superseded { current: 9 })
        );
        assert_eq!(
            renewal(array(vec![text("not_found")])),
            Err(StoreError::NotFound)
        );
        for malformed in [text("okay"), text(""), Value::Int(1), Value::Nil] {
            assert!(
                matches!(renewal(malformed), Err(StoreError::Corrupt(_))),
                "a renewal reply that is neither ok nor a refusal is corrupt"
            );
        }
    }

    #[test]
    fn malformed_replies_are_corrupt_not_panics() {
        let cases = vec![
            Value::Nil,
            Value::Int(1),
            array(vec![]),
            array(vec![text("maybe")]),
            array(vec![Value::Nil]),
            array(vec![text("corrupt"), text("generation is missing")]),
        ];
        for case in cases {
            assert!(
                matches!(Reply::decode(case), Err(StoreError::Corrupt(_))),
                "must be corrupt"
            );
        }
        let mut reply = Reply::decode(array(vec![text("ok"), text("-1"), text("x")])).expect("ok");
        assert!(matches!(
            reply.number::<u64>("generation"),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            reply.number::<u16>("count"),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(reply.bytes("seed"), Err(StoreError::Corrupt(_))));
        let mut big = Reply::decode(array(vec![text("ok"), Value::Int(70_000)])).expect("ok");
        assert!(matches!(
            big.number::<u16>("count"),
            Err(StoreError::Corrupt(_))
        ));
    }
}
