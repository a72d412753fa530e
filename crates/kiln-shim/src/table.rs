//! The containers this shim serves, by id, and the cleanups of those it has deleted.
//!
//! A Create reserves its id before it does anything else, so a second Create for the same id
//! fails at once with AlreadyExists instead of racing the first; the reservation is released
//! by a guard when that Create fails or is cancelled. A shared shim's idle exit counts
//! reservations as well as containers.
//!
//! A deleted container's cgroup is removed in the background (it waits for the kernel to take
//! controllers offline). That cleanup belongs to that container, not to its id: a Create that
//! reuses the id waits for it first, so it can never remove or kill what the new container
//! made.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use crate::task::Task;

enum Slot {
    Creating,
    Live(Arc<Task>),
}

/// The task table.
#[derive(Default)]
pub struct Table {
    slots: Mutex<HashMap<String, Slot>>,
    cleanups: Mutex<HashMap<String, Vec<JoinHandle<()>>>>,
}

/// A reserved id; dropped without [`Reservation::commit`], it frees the id.
pub struct Reservation<'a> {
    table: &'a Table,
    id: String,
    committed: bool,
}

impl Reservation<'_> {
    /// Puts the created task in the reserved slot.
    pub fn commit(mut self, task: Arc<Task>) {
        self.table.slots().insert(self.id.clone(), Slot::Live(task));
        self.committed = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.committed {
            let mut slots = self.table.slots();
            if matches!(slots.get(&self.id), Some(Slot::Creating)) {
                slots.remove(&self.id);
            }
        }
    }
}

impl Table {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cleanup_list(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<JoinHandle<()>>>> {
        let mut c = self.cleanups.lock().unwrap_or_else(|p| p.into_inner());
        c.retain(|_, v| {
            v.retain(|t| !t.is_finished());
            !v.is_empty()
        });
        c
    }

    /// Reserves `id`, or `None` if a container (or a Create) has it.
    pub fn reserve(&self, id: &str) -> Option<Reservation<'_>> {
        let mut slots = self.slots();
        if slots.contains_key(id) {
            return None;
        }
        slots.insert(id.to_string(), Slot::Creating);
        Some(Reservation {
            table: self,
            id: id.to_string(),
            committed: false,
        })
    }

    /// The live container `id`.
    pub fn get(&self, id: &str) -> Option<Arc<Task>> {
        match self.slots().get(id) {
            Some(Slot::Live(t)) => Some(t.clone()),
            _ => None,
        }
    }

    /// Takes `task` out of the table (Delete), if it is still the one under its id.
    pub fn remove(&self, task: &Arc<Task>) {
        let mut slots = self.slots();
        if matches!(slots.get(&task.id), Some(Slot::Live(t)) if Arc::ptr_eq(t, task)) {
            slots.remove(&task.id);
        }
    }

    /// No container and no Create in flight.
    pub fn is_idle(&self) -> bool {
        self.slots().is_empty()
    }

    /// Runs `cleanup` for the deleted container `id` in the background.
    pub fn clean_up_in_background(&self, id: &str, cleanup: impl FnOnce() + Send + 'static) {
        let task = tokio::task::spawn_blocking(cleanup);
        self.cleanup_list()
            .entry(id.to_string())
            .or_default()
            .push(task);
    }

    /// Waits for the background cleanups of an earlier container with this `id`.
    pub async fn cleanups_of(&self, id: &str) {
        let pending = self.cleanup_list().remove(id).unwrap_or_default();
        for t in pending {
            let _ = t.await;
        }
    }

    /// Waits for every background cleanup (before the shim exits).
    pub async fn all_cleanups(&self) {
        let pending: Vec<JoinHandle<()>> =
            self.cleanup_list().drain().flat_map(|(_, v)| v).collect();
        for t in pending {
            let _ = t.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_reserved_at_once_and_freed_by_a_failed_create() {
        let table = Table::default();
        let first = table.reserve("c1").expect("free");
        assert!(
            table.reserve("c1").is_none(),
            "a second Create of c1 must fail at once"
        );
        assert!(
            !table.is_idle(),
            "a Create in flight keeps a shared shim up"
        );
        assert!(
            table.get("c1").is_none(),
            "a reservation is not a container"
        );
        drop(first);
        assert!(table.is_idle());
        assert!(
            table.reserve("c1").is_some(),
            "a failed Create frees its id"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_create_waits_for_the_cleanup_of_the_id_it_reuses() {
        let table = Table::default();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = done.clone();
        table.clean_up_in_background("c1", move || {
            let _ = rx.recv();
            d.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let waiter = table.cleanups_of("c1");
        tx.send(()).expect("release the cleanup");
        waiter.await;
        assert!(done.load(std::sync::atomic::Ordering::SeqCst));
    }
}
