//! Event schema evolution: upcasters turn events stored at an older version of their type into
//! the current shapes, so `evolve` and handlers only ever see those.
//!
//! Each stored row carries the version of its type it was written at (`message_schema_version`:
//! `v2`, `v3`, …; a row without the `v` — written before its type had versions, or by the
//! TypeScript package, which stores the event's index in its append there — is at version 1). An
//! upcaster is a step of one type from version `n` to `n + 1`: a pure function over the stored
//! JSON that returns the events the row becomes — one (reshaped or renamed), several (a split) or
//! none (a dropped type). Steps chain until every event is at its type's current version, and
//! apply wherever the store reads events: `read_stream`, `aggregate_stream`, the command
//! handler, both runners, the daemon, reactors and rebuilds. Appends write the current version.
//!
//! **Positions stay the stored rows'**: every event a row becomes carries that row's
//! `stream_position` and `global_position` (a split's events share them; a dropped row leaves a
//! gap in the positions read). Checkpoints and expected versions count stored rows.
//!
//! ```
//! use emmett_seaorm::upcast::{RawEvent, Upcasters};
//! use serde_json::json;
//!
//! let upcasters = Upcasters::new()
//!     // v1 → v2: `amount` in cents became `{ "cents": … }`.
//!     .step("Deposited", 1, |mut e: RawEvent| {
//!         let cents = e.data["amount"].take();
//!         e.data["amount"] = json!({ "cents": cents });
//!         vec![e]
//!     })
//!     // v1 → v2: `Moved` is now a withdrawal and a deposit.
//!     .step("Moved", 1, |e: RawEvent| {
//!         let amount = e.data["amount"].clone();
//!         vec![e.renamed("Withdrawn", json!({ "amount": amount.clone() })),
//!              e.renamed("Deposited", json!({ "amount": { "cents": amount } }))]
//!     })
//!     // `Withdrawn` started at version 2 (`Moved`'s split writes it there).
//!     .current("Withdrawn", 2);
//! upcasters.check().unwrap();
//! assert_eq!(upcasters.current_version("Deposited"), 2);
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use serde_json::Value;

use crate::error::{Error, Result};

/// A stored event as an upcaster sees it: its type, the version of the type it is at, and its
/// raw data and metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEvent {
    /// `message_type`.
    pub message_type: String,
    /// The version of the type the event is at.
    pub version: u32,
    /// `message_data`.
    pub data: Value,
    /// `message_metadata`.
    pub metadata: Value,
}

impl RawEvent {
    /// Renames the field `from` of the data (an object) to `to`; nothing when it has none.
    ///
    /// ```
    /// # use emmett_seaorm::upcast::RawEvent;
    /// # use serde_json::json;
    /// let mut e = RawEvent { message_type: "ItemAdded".into(), version: 1, data: json!({ "qty": 2 }), metadata: json!({}) };
    /// e.rename_field("qty", "quantity");
    /// assert_eq!(e.data, json!({ "quantity": 2 }));
    /// ```
    pub fn rename_field(&mut self, from: &str, to: &str) {
        if let Some(data) = self.data.as_object_mut()
            && let Some(value) = data.remove(from)
        {
            data.insert(to.to_owned(), value);
        }
    }

    /// Another event from this one: `message_type` with `data`, the same metadata (for a rename
    /// or a split).
    pub fn renamed(&self, message_type: impl Into<String>, data: Value) -> RawEvent {
        RawEvent { message_type: message_type.into(), version: self.version, data, metadata: self.metadata.clone() }
    }
}

/// One step: what an event at some version becomes at the next.
type Step = Arc<dyn Fn(RawEvent) -> Vec<RawEvent> + Send + Sync>;

/// The upcasters of a store: the current version of each event type and the steps from older
/// ones (see the [module](self)). Register them with
/// [`EventStore::with_upcasters`](crate::EventStore::with_upcasters), which refuses an
/// inconsistent set ([`check`](Self::check)).
#[derive(Clone, Default)]
pub struct Upcasters {
    /// Versions declared with [`current`](Self::current).
    declared: BTreeMap<String, u32>,
    steps: BTreeMap<(String, u32), Step>,
    /// Steps registered twice.
    duplicates: Vec<(String, u32)>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let steps: Vec<String> = self.steps.keys().map(|(t, v)| format!("{t} v{v}→v{}", v + 1)).collect();
        f.debug_struct("Upcasters").field("declared", &self.declared).field("steps", &steps).finish()
    }
}

impl Upcasters {
    /// No upcasters: every type at version 1.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the step of `message_type` from version `from` to `from + 1`: `upcast` gets a
    /// stored event at `from` and returns the events it becomes, of any types; each is taken to
    /// be at version `from + 1` of its type (the `version` it returns is ignored) and upcast
    /// further from there.
    pub fn step<F>(mut self, message_type: impl Into<String>, from: u32, upcast: F) -> Self
    where
        F: Fn(RawEvent) -> Vec<RawEvent> + Send + Sync + 'static,
    {
        let key = (message_type.into(), from);
        if self.steps.insert(key.clone(), Arc::new(upcast)).is_some() {
            self.duplicates.push(key);
        }
        self
    }

    /// Declares the current version of `message_type` where its steps don't say it (a type
    /// first written by another's step, at that step's version). Without it a type's current
    /// version is one past its last step, or 1.
    pub fn current(mut self, message_type: impl Into<String>, version: u32) -> Self {
        self.declared.insert(message_type.into(), version);
        self
    }

    /// The version appends write for `message_type`.
    pub fn current_version(&self, message_type: &str) -> u32 {
        let stepped = self.steps.range((message_type.to_owned(), 0)..).take_while(|((t, _), _)| t == message_type);
        let past_steps = stepped.last().map_or(1, |((_, from), _)| from + 1);
        self.declared.get(message_type).copied().unwrap_or(past_steps)
    }

    /// [`Error::InvalidUpcasters`] for a step registered twice, a version 0, a type whose steps
    /// leave a gap (v1→v2 and v3→v4 without v2→v3), or a declared current version its steps
    /// pass.
    pub fn check(&self) -> Result<()> {
        let invalid = |reason: String| Err(Error::InvalidUpcasters { reason });
        if let Some((message_type, from)) = self.duplicates.first() {
            return invalid(format!("two upcasters of '{message_type}' from version {from}"));
        }
        let mut by_type: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for (message_type, from) in self.steps.keys() {
            by_type.entry(message_type).or_default().push(*from);
        }
        for (message_type, froms) in by_type {
            if froms[0] == 0 {
                return invalid(format!("an upcaster of '{message_type}' from version 0 (versions start at 1)"));
            }
            if let Some(pair) = froms.windows(2).find(|w| w[1] != w[0] + 1) {
                let reason = format!(
                    "the upcasters of '{message_type}' skip from version {} to {}: no step from {}",
                    pair[0] + 1,
                    pair[1],
                    pair[0] + 1
                );
                return invalid(reason);
            }
            let last = froms[froms.len() - 1];
            if self.declared.get(message_type).is_some_and(|&current| current <= last) {
                let current = self.declared[message_type];
                let reason = format!("'{message_type}' is declared at version {current} but has a step from {last}");
                return invalid(reason);
            }
        }
        if let Some((message_type, _)) = self.declared.iter().find(|(_, v)| **v == 0) {
            return invalid(format!("'{message_type}' declared at version 0 (versions start at 1)"));
        }
        Ok(())
    }

    /// Whether any step is registered (else reads skip upcasting).
    pub(crate) fn is_empty(&self) -> bool {
        self.steps.is_empty() && self.declared.is_empty()
    }

    /// The events `event` becomes at the current versions, in order; `Err` says why it can't
    /// (a version newer than the code knows, no step from an older one, a step that panicked).
    pub(crate) fn upcast(&self, event: RawEvent) -> std::result::Result<Vec<RawEvent>, String> {
        let mut done = Vec::new();
        let mut todo = vec![event];
        while let Some(event) = todo.pop() {
            let current = self.current_version(&event.message_type);
            if event.version == current {
                done.push(event);
                continue;
            }
            let (message_type, version) = (event.message_type.clone(), event.version);
            if version > current {
                return Err(format!(
                    "version {version} of '{message_type}' is newer than this code knows ({current}): \
                     written by a newer release?"
                ));
            }
            let Some(step) = self.steps.get(&(message_type.clone(), version)) else {
                return Err(format!("no upcaster of '{message_type}' from version {version} (current: {current})"));
            };
            let outputs = std::panic::catch_unwind(AssertUnwindSafe(|| step(event))).map_err(|panic| {
                format!(
                    "the upcaster of '{message_type}' from version {version} panicked: {}",
                    crate::error::panicked(panic)
                )
            })?;
            // (Reversed onto the stack: the first output is upcast and emitted first.)
            todo.extend(outputs.into_iter().rev().map(|e| RawEvent { version: version + 1, ..e }));
        }
        Ok(done)
    }
}

/// How a version is stored in `message_schema_version`: `"1"` for version 1 (what this crate
/// always wrote), `"v<n>"` from version 2 on. The TypeScript package writes the event's index
/// in its append there (`"0"`, `"1"`, `"2"`, …), not a version: so only a `v` marks one, and
/// anything else is version 1, the shape every writer used before versions.
pub(crate) fn stored_version(version: u32) -> String {
    match version {
        1 => "1".to_owned(),
        n => format!("v{n}"),
    }
}

/// The version a stored `message_schema_version` means (see [`stored_version`]).
pub(crate) fn parse_version(stored: &str) -> std::result::Result<u32, String> {
    match stored.strip_prefix('v') {
        Some(number) => number
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("message_schema_version '{stored}' is not a version ('v' and a number from 1)")),
        None => Ok(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(message_type: &str, version: u32, data: Value) -> RawEvent {
        RawEvent { message_type: message_type.into(), version, data, metadata: json!({ "m": 1 }) }
    }

    fn chain() -> Upcasters {
        Upcasters::new()
            .step("Placed", 1, |mut e| {
                e.data["total"] = json!({ "cents": e.data["total"].take() });
                vec![e]
            })
            .step("Placed", 2, |e| vec![e.renamed("OrderPlaced", e.data.clone())])
            .current("OrderPlaced", 3)
            .step("Moved", 1, |e| vec![e.renamed("Out", json!({})), e.renamed("In", json!({}))])
            .current("Out", 2)
            .current("In", 2)
            .step("Noise", 1, |_| vec![])
    }

    #[test]
    fn chains_rename_split_and_drop() {
        let u = chain();
        u.check().unwrap();
        let up = |e| u.upcast(e).unwrap();
        assert_eq!(
            up(raw("Placed", 1, json!({ "total": 5 }))),
            [raw("OrderPlaced", 3, json!({ "total": { "cents": 5 } }))]
        );
        assert_eq!(up(raw("Placed", 2, json!({ "total": 7 }))), [raw("OrderPlaced", 3, json!({ "total": 7 }))]);
        assert_eq!(up(raw("Moved", 1, json!({}))), [raw("Out", 2, json!({})), raw("In", 2, json!({}))]);
        assert_eq!(up(raw("Noise", 1, json!({}))), []);
        assert_eq!(up(raw("Other", 1, json!({ "x": 1 }))), [raw("Other", 1, json!({ "x": 1 }))]);
        assert_eq!((u.current_version("Placed"), u.current_version("Other")), (3, 1));
    }

    /// The README's chain ("Changing an event").
    #[test]
    fn the_readme_chain_ends_at_the_current_shapes() {
        let u = Upcasters::new()
            .step("ItemAdded", 1, |mut e| {
                e.rename_field("qty", "quantity");
                vec![e]
            })
            .step("ItemAdded", 2, |mut e| {
                let cents = e.data["price"].take();
                e.data["price"] = json!({ "cents": cents, "currency": "EUR" });
                vec![e]
            })
            .step("ItemReplaced", 1, |e| {
                let sku = &e.data["sku"];
                vec![
                    e.renamed("ItemRemoved", json!({ "sku": sku })),
                    e.renamed(
                        "ItemAdded",
                        json!({ "sku": e.data["new_sku"], "quantity": 1, "price": e.data["price"] }),
                    ),
                ]
            })
            .current("ItemRemoved", 2);
        u.check().unwrap();
        let old = raw("ItemAdded", 1, json!({ "sku": "a", "qty": 2, "price": 250 }));
        let money = json!({ "cents": 250, "currency": "EUR" });
        assert_eq!(u.upcast(old).unwrap(), [raw("ItemAdded", 3, json!({ "sku": "a", "quantity": 2, "price": money }))]);
        let replaced = raw("ItemReplaced", 1, json!({ "sku": "a", "new_sku": "b", "price": 250 }));
        assert_eq!(
            u.upcast(replaced).unwrap(),
            [
                raw("ItemRemoved", 2, json!({ "sku": "a" })),
                raw("ItemAdded", 3, json!({ "sku": "b", "quantity": 1, "price": money })),
            ]
        );
    }

    #[test]
    fn newer_or_unknown_versions_and_panics_are_errors() {
        let u = chain().step("Boom", 1, |_| panic!("no"));
        assert!(u.upcast(raw("Placed", 4, json!({}))).unwrap_err().contains("newer than this code knows"));
        assert!(u.upcast(raw("Other", 2, json!({}))).unwrap_err().contains("newer"));
        assert!(u.upcast(raw("Boom", 1, json!({}))).unwrap_err().contains("panicked: no"));
        let late = Upcasters::new().step("T", 2, |e| vec![e]);
        assert!(late.upcast(raw("T", 1, json!({}))).unwrap_err().contains("no upcaster of 'T' from version 1"));
    }

    #[test]
    fn stored_versions_tell_versions_from_the_typescript_packages_indexes() {
        for version in [1, 2, 17] {
            assert_eq!(parse_version(&stored_version(version)), Ok(version));
        }
        assert_eq!(stored_version(2), "v2");
        // Older rows and the TypeScript package's (the event's index in its append): version 1.
        for stored in ["1", "0", "2", "15", ""] {
            assert_eq!(parse_version(stored), Ok(1), "{stored}");
        }
        for bad in ["v", "v0", "vx", "v-1"] {
            assert!(parse_version(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn inconsistent_sets_are_refused() {
        let refused = |u: Upcasters| u.check().unwrap_err().to_string();
        assert!(
            refused(Upcasters::new().step("T", 1, |e| vec![e]).step("T", 1, |e| vec![e])).contains("two upcasters")
        );
        assert!(
            refused(Upcasters::new().step("T", 1, |e| vec![e]).step("T", 3, |e| vec![e])).contains("no step from 2")
        );
        assert!(refused(Upcasters::new().step("T", 0, |e| vec![e])).contains("version 0"));
        assert!(refused(Upcasters::new().step("T", 2, |e| vec![e]).current("T", 2)).contains("declared at version 2"));
        assert!(refused(Upcasters::new().current("T", 0)).contains("version 0"));
    }
}
