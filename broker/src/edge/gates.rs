//! One engine link per device identity at a time, the newest connection winning.
//!
//! rumqttd reuses a connection id as soon as its router has dropped the connection. When a
//! device reconnects at once (or a second connection takes its session over), the old link's
//! disconnect event can reach the router after the new link has registered under the same id,
//! and the router then drops the new link right after its CONNACK, or before it: rumqttd 0.20
//! then leaves a will handler behind that panics the listener's next CONNECT with this client
//! id while holding a lock, poisoning the listener for every device. So a new link waits until
//! the previous one for its identity has been closed by the engine (which sends its router the
//! disconnect before it closes the socket), and a newer connection tells the current one to
//! step down.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub(crate) struct Gates {
    slots: Mutex<HashMap<String, Slot>>,
}

#[derive(Default)]
struct Slot {
    gate: Arc<tokio::sync::Mutex<()>>,
    /// Connections that have asked for this identity; the slot goes when none is left.
    users: usize,
    /// The newest connection's number: an older one still waiting gives way.
    latest: u64,
    /// Cancelled when a newer connection arrives: the link holding the gate.
    holder: Option<CancellationToken>,
    /// Cancelled when a newer connection arrives: the one waiting for the gate, which then
    /// gives way at once, so that an identity never has more than one connection waiting.
    waiting: Option<CancellationToken>,
}

/// The right to hold the identity's engine link, until dropped.
pub(crate) struct Ticket {
    gates: Arc<Gates>,
    identity: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Gates {
    /// Waits until this connection may open the identity's engine link: the link open now
    /// is told to close (through its `taken_over` token) and has closed. `None` when a newer
    /// connection for the identity came meanwhile: that one takes the session instead.
    pub(crate) async fn enter(
        self: &Arc<Self>,
        identity: &str,
        taken_over: CancellationToken,
    ) -> Option<Ticket> {
        let superseded = CancellationToken::new();
        let (gate, number) = {
            let mut slots = self.slots.lock();
            let slot = slots.entry(identity.to_string()).or_default();
            slot.users += 1;
            slot.latest += 1;
            if let Some(holder) = &slot.holder {
                holder.cancel();
            }
            if let Some(older) = slot.waiting.replace(superseded.clone()) {
                older.cancel();
            }
            (slot.gate.clone(), slot.latest)
        };
        let mut ticket = Ticket {
            gates: self.clone(),
            identity: identity.to_string(),
            guard: None,
        };

        let guard = tokio::select! {
            guard = gate.lock_owned() => guard,
            _ = superseded.cancelled() => return None,
        };

        let mut slots = self.slots.lock();
        let slot = slots.get_mut(identity)?;
        if slot.latest != number {
            return None;
        }
        slot.waiting = None;
        slot.holder = Some(taken_over);
        ticket.guard = Some(guard);
        drop(slots);
        Some(ticket)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.lock().len()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut slots = self.gates.slots.lock();
        let Some(slot) = slots.get_mut(&self.identity) else {
            return;
        };
        if self.guard.is_some() {
            slot.holder = None;
        }
        // Released under the map's lock, so that the next holder registers after this one
        // has left.
        drop(self.guard.take());
        slot.users -= 1;
        if slot.users == 0 {
            slots.remove(&self.identity);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A connection asking for `identity`'s link in the background: whether it got it.
    fn spawn_enter(
        gates: &Arc<Gates>,
        identity: &'static str,
    ) -> tokio::task::JoinHandle<Option<Ticket>> {
        let gates = gates.clone();
        tokio::spawn(async move { gates.enter(identity, CancellationToken::new()).await })
    }

    #[tokio::test]
    async fn a_newer_connection_waits_for_the_link_open_now_and_tells_it_to_close() {
        let gates = Arc::new(Gates::default());
        let first_token = CancellationToken::new();
        let first = gates
            .enter("bed-1", first_token.clone())
            .await
            .expect("the gate");

        let waiting = spawn_enter(&gates, "bed-1");
        tokio::time::timeout(Duration::from_secs(5), first_token.cancelled())
            .await
            .expect("the open link told to close");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "entered while the first link was open"
        );

        drop(first);
        let entered = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("entered once the first link closed")
            .expect("no panic");
        assert!(entered.is_some());
        drop(entered);
        assert_eq!(gates.len(), 0, "the slot goes with its last connection");
    }

    #[tokio::test]
    async fn of_two_waiting_connections_only_the_newest_gets_the_link() {
        let gates = Arc::new(Gates::default());
        let first = spawn_enter(&gates, "bed-1")
            .await
            .expect("no panic")
            .expect("the gate");
        let second = spawn_enter(&gates, "bed-1");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let third = spawn_enter(&gates, "bed-1");

        let second = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the older waiting connection gave way at once, the gate still held")
            .expect("no panic");
        assert!(second.is_none());
        drop(first);
        let third = third.await.expect("no panic");
        assert!(third.is_some());
        drop(third);
        assert_eq!(gates.len(), 0);
    }

    #[tokio::test]
    async fn identities_do_not_wait_for_each_other() {
        let gates = Arc::new(Gates::default());
        let _first = spawn_enter(&gates, "bed-1")
            .await
            .expect("no panic")
            .expect("the gate");
        let other = tokio::time::timeout(Duration::from_secs(5), spawn_enter(&gates, "bed-2"))
            .await
            .expect("not held up by another identity")
            .expect("no panic");
        assert!(other.is_some());
    }
}
