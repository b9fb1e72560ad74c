//! One `Arc` per distinct model and tenant name among the requests the
//! scheduler holds.
//!
//! Every request arrives with its own `Arc` of its model name. A view
//! clones that `Arc` for each waiting request in the window, per decision,
//! and each clone is an atomic operation on that request's own allocation:
//! a cache line per record. Interned at submission, the requests of one
//! model share one `Arc`, whose count stays in cache, and the plugin
//! boundary's name table recognises a repeated name by its address.

use std::sync::Arc;

use rustc_hash::FxHashSet;

/// Names kept at most; beyond that, names no request holds are dropped,
/// and if every one is still held a new name is not interned (its request
/// keeps its own `Arc`): clients choose model names, so the table is bounded.
const MAX_NAMES: usize = 1024;

/// The scheduler's name table.
#[derive(Debug, Default)]
pub(super) struct Interner {
    set: FxHashSet<Arc<str>>,
}

impl Interner {
    /// The shared `Arc` of `name`'s text (`name` itself the first time).
    pub(super) fn intern(&mut self, name: Arc<str>) -> Arc<str> {
        if let Some(shared) = self.set.get(&*name) {
            return shared.clone();
        }
        if self.set.len() >= MAX_NAMES {
            // Only the table holds these: no request uses the name now.
            self.set.retain(|n| Arc::strong_count(n) > 1);
            if self.set.len() >= MAX_NAMES {
                return name;
            }
        }
        self.set.insert(name.clone());
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_name_one_arc() {
        let mut names = Interner::default();
        let a = names.intern("llama3".into());
        let b = names.intern("llama3".into());
        assert!(Arc::ptr_eq(&a, &b));
        let c = names.intern("qwen".into());
        assert!(!Arc::ptr_eq(&a, &c));
    }

    #[test]
    fn the_table_is_bounded_and_forgets_names_no_request_holds() {
        let mut names = Interner::default();
        let held: Vec<Arc<str>> = (0..MAX_NAMES)
            .map(|i| names.intern(format!("m{i}").into()))
            .collect();
        // Full, every name held: a new one is not kept.
        let extra: Arc<str> = "extra".into();
        let got = names.intern(extra.clone());
        assert!(Arc::ptr_eq(&got, &extra));
        assert_eq!(names.set.len(), MAX_NAMES);
        assert!(!Arc::ptr_eq(&names.intern("extra".into()), &extra));
        // Once requests let go of their names, room is made.
        drop(held);
        let again = names.intern("extra".into());
        assert_eq!(names.set.len(), 1);
        assert!(Arc::ptr_eq(&again, &names.intern("extra".into())));
    }
}
