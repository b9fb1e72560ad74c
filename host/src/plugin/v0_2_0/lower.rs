//! `schedule`'s argument with a lowering that writes the candidate window
//! into the sandbox in one copy.
//!
//! wasmtime's derived lowering stores a record field by field, and every
//! store looks the guest's memory up again (`LowerContext::get`): with a
//! window of 128 waiting requests (the default then) of 10 fields each,
//! that was most of a call's cost, and the main reason throughput fell as
//! the queue grew. [`Waiting`] lowers a
//! whole list in one pass: it looks the memory up once and writes every
//! record's bytes, in the canonical ABI's layout, into the space the guest
//! allocated for the list. The layout is computed from the field types' own
//! ABI descriptions, and `admit` and `schedule` are looked up as typed
//! functions whose parameters wasmtime type-checks against the plugin's WIT
//! at instantiation: a record that drifted from `policy.wit` fails to load.
//!
//! `Lower`'s methods are wasmtime internals (hidden from its docs); the
//! crate is pinned to wasmtime 48 by Cargo.lock, and the echo test below
//! (wasmtime's own lifting reads back what this writes, on dirty memory)
//! fails if an upgrade changes what they mean.
//!
//! Everything else in the view (names, backends, running requests) keeps
//! the generated types and lowering: few records, small cost.

use std::mem::MaybeUninit;

use wasmtime::component::__internal::{CanonicalAbiInfo, InterfaceType, LowerContext};
use wasmtime::component::{ComponentType, Lift, Lower};

use super::wit;

/// `types.waiting`, lowered in bulk (lifted as wasmtime derives it: only
/// the tests lift one).
#[derive(ComponentType, Lift, Debug, Clone, Copy, PartialEq)]
#[component(record)]
pub(super) struct Waiting {
    pub id: u64,
    pub class: wit::Class,
    pub priority: f64,
    pub model: u32,
    pub tenant: Option<u32>,
    #[component(name = "stream")]
    pub stream: bool,
    #[component(name = "num-predict")]
    pub num_predict: Option<i64>,
    #[component(name = "arrival-ms")]
    pub arrival_ms: u64,
    #[component(name = "enqueued-ms")]
    pub enqueued_ms: u64,
    pub preemptions: u32,
}

/// `types.view`, with the window as [`Waiting`].
#[derive(ComponentType, Lower, Debug, Clone)]
#[component(record)]
pub(super) struct View {
    #[component(name = "now-ms")]
    pub now_ms: u64,
    #[component(name = "total-slots")]
    pub total_slots: u32,
    #[component(name = "free-slots")]
    pub free_slots: u32,
    pub names: Vec<String>,
    pub backends: Vec<wit::Backend>,
    pub running: Vec<wit::Running>,
    pub waiting: Vec<Waiting>,
    pub beyond: Vec<wit::Beyond>,
}

/// Byte offsets of `waiting`'s fields in the canonical ABI (32-bit memory),
/// in declaration order, from each field type's own ABI.
const FIELD: [usize; 10] = {
    let abis: [CanonicalAbiInfo; 10] = [
        <u64 as ComponentType>::ABI,
        <wit::Class as ComponentType>::ABI,
        <f64 as ComponentType>::ABI,
        <u32 as ComponentType>::ABI,
        <Option<u32> as ComponentType>::ABI,
        <bool as ComponentType>::ABI,
        <Option<i64> as ComponentType>::ABI,
        <u64 as ComponentType>::ABI,
        <u64 as ComponentType>::ABI,
        <u32 as ComponentType>::ABI,
    ];
    let mut out = [0; 10];
    let mut at = 0u32;
    let mut i = 0;
    while i < abis.len() {
        let align = abis[i].align32;
        at = at.div_ceil(align) * align;
        out[i] = at as usize;
        at += abis[i].size32;
        i += 1;
    }
    out
};

/// Offset of an option's payload after its one-byte discriminant.
const fn payload(abi: CanonicalAbiInfo) -> usize {
    abi.align32 as usize
}

const SIZE: usize = <Waiting as ComponentType>::SIZE32;
const _: () = assert!(FIELD[9] + 4 <= SIZE, "the last field fits the record");

impl Waiting {
    /// The record's bytes as the canonical ABI lays them out (padding zero).
    fn encode(&self, out: &mut [u8]) {
        let out: &mut [u8; SIZE] = out.try_into().expect("one record's bytes");
        out.fill(0);
        let mut put = |at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
        put(FIELD[0], &self.id.to_le_bytes());
        put(FIELD[1], &[self.class as u8]);
        put(FIELD[2], &self.priority.to_le_bytes());
        put(FIELD[3], &self.model.to_le_bytes());
        if let Some(t) = self.tenant {
            put(FIELD[4], &[1]);
            put(
                FIELD[4] + payload(<u32 as ComponentType>::ABI),
                &t.to_le_bytes(),
            );
        }
        put(FIELD[5], &[self.stream as u8]);
        if let Some(n) = self.num_predict {
            put(FIELD[6], &[1]);
            put(
                FIELD[6] + payload(<i64 as ComponentType>::ABI),
                &n.to_le_bytes(),
            );
        }
        put(FIELD[7], &self.arrival_ms.to_le_bytes());
        put(FIELD[8], &self.enqueued_ms.to_le_bytes());
        put(FIELD[9], &self.preemptions.to_le_bytes());
    }
}

// SAFETY: every method writes exactly the canonical ABI bytes of `waiting`
// (the layout above, from the field types' ABIs) within the range the
// caller checked, and `schedule`'s typed lookup checked this record against
// the plugin's type. The code is safe Rust (slice indexing panics, it never
// writes out of range); `unsafe` is only the trait's marker.
#[allow(unsafe_code)]
unsafe impl Lower for Waiting {
    fn linear_lower_to_flat<T>(
        &self,
        _cx: &mut LowerContext<'_, T>,
        _ty: InterfaceType,
        _dst: &mut MaybeUninit<Self::Lower>,
    ) -> wasmtime::Result<()> {
        // `waiting` only ever crosses inside `view.waiting`, a list, which
        // is stored in memory, never flattened.
        wasmtime::bail!("a waiting record is only lowered inside a list")
    }

    fn linear_lower_to_memory<T>(
        &self,
        cx: &mut LowerContext<'_, T>,
        _ty: InterfaceType,
        offset: usize,
    ) -> wasmtime::Result<()> {
        self.encode(&mut cx.as_slice_mut()[offset..][..SIZE]);
        Ok(())
    }

    fn linear_store_list_to_memory<T>(
        cx: &mut LowerContext<'_, T>,
        _ty: InterfaceType,
        offset: usize,
        items: &[Self],
    ) -> wasmtime::Result<()> {
        let memory = &mut cx.as_slice_mut()[offset..][..items.len() * SIZE];
        for (w, out) in items.iter().zip(memory.chunks_exact_mut(SIZE)) {
            w.encode(out);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use wasmtime::component::{Component, Linker};
    use wasmtime::{Engine, Store};

    use super::*;

    /// A component that hands back the list it was given: the host lowers
    /// it with [`Waiting`]'s bulk encoder and lifts it back with wasmtime's
    /// own derived code, which reads the canonical ABI field by field.
    const ECHO: &str = r#"
(component
  (type $class (enum "realtime" "batch"))
  (export $class-e "class" (type $class))
  (type $waiting (record
    (field "id" u64)
    (field "class" $class-e)
    (field "priority" f64)
    (field "model" u32)
    (field "tenant" (option u32))
    (field "stream" bool)
    (field "num-predict" (option s64))
    (field "arrival-ms" u64)
    (field "enqueued-ms" u64)
    (field "preemptions" u32)))
  (export $waiting-e "waiting" (type $waiting))
  (core module $m
    (memory (export "memory") 1)
    (global $next (mut i32) (i32.const 64))
    ;; A bump allocator: align, hand out, never free. What it hands out
    ;; is dirty (all ones), as memory a guest's allocator reuses is: a
    ;; byte the lowering forgets to write shows.
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (local.set $p
        (i32.and
          (i32.add (global.get $next) (i32.sub (local.get 2) (i32.const 1)))
          (i32.sub (i32.const 0) (local.get 2))))
      (global.set $next (i32.add (local.get $p) (local.get 3)))
      (memory.fill (local.get $p) (i32.const 0xff) (local.get 3))
      (local.get $p))
    ;; The result is the same (pointer, length), stored at 0.
    (func (export "echo") (param i32 i32) (result i32)
      (i32.store (i32.const 0) (local.get 0))
      (i32.store (i32.const 4) (local.get 1))
      (i32.const 0)))
  (core instance $i (instantiate $m))
  (func (export "echo") (param "v" (list $waiting-e)) (result (list $waiting-e))
    (canon lift (core func $i "echo") (memory (core memory $i "memory"))
      (realloc (core func $i "realloc"))))
)"#;

    fn echo(sent: Vec<Waiting>) -> Vec<Waiting> {
        let engine = Engine::default();
        let bytes = wat::parse_str(ECHO).expect("the echo component parses");
        let component = Component::new(&engine, bytes).expect("it compiles");
        let mut store = Store::new(&engine, ());
        let instance = Linker::new(&engine)
            .instantiate(&mut store, &component)
            .expect("it instantiates");
        let f = instance
            .get_typed_func::<(Vec<Waiting>,), (Vec<Waiting>,)>(&mut store, "echo")
            .expect("Waiting type-checks against the WIT record");
        f.call(&mut store, (sent,)).expect("echo").0
    }

    #[test]
    fn the_bulk_lowering_writes_what_wasmtimes_own_lifting_reads() {
        // Every field at both ends of its range, both variants of each
        // option and of the class, and records whose neighbours differ, so
        // a wrong offset or a skipped padding byte shows.
        let sent: Vec<Waiting> = (0..100u64)
            .map(|i| Waiting {
                id: if i == 0 {
                    u64::MAX
                } else {
                    i * 0x0101_0101_0101
                },
                class: if i % 3 == 0 {
                    wit::Class::Realtime
                } else {
                    wit::Class::Batch
                },
                priority: if i == 1 { -0.0 } else { i as f64 * -1.25 + 0.5 },
                model: if i == 2 { u32::MAX } else { i as u32 * 7 },
                tenant: (i % 2 == 0).then_some(if i == 4 { u32::MAX } else { i as u32 }),
                stream: i % 5 == 0,
                num_predict: match i % 4 {
                    0 => None,
                    1 => Some(i64::MIN),
                    2 => Some(i64::MAX),
                    _ => Some(i as i64 - 50),
                },
                arrival_ms: u64::MAX - i,
                enqueued_ms: i << 40,
                preemptions: if i == 3 { u32::MAX } else { i as u32 % 4 },
            })
            .collect();
        assert_eq!(echo(sent.clone()), sent);
        assert_eq!(echo(Vec::new()), Vec::new());
    }

    #[test]
    fn the_layout_is_the_canonical_abis() {
        // Spelled out once by hand from the canonical ABI rules, as a
        // reader's check of the computed offsets.
        assert_eq!(FIELD, [0, 8, 16, 24, 28, 36, 40, 56, 64, 72]);
        assert_eq!((SIZE, <Waiting as ComponentType>::ALIGN32), (80, 8));
    }
}
