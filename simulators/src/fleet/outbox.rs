//! A device's own bookkeeping of what it still has to deliver, so that no reading is lost
//! to a reconnect.
//!
//! rumqttc 0.25 forgets its queued and unacknowledged publishes when a reconnect finds no
//! session on the broker (`session present = 0`, as after a broker restart). So a reading
//! stays here until the broker has acknowledged it: waiting in the queue, issued to the
//! client (no packet id seen yet), or in flight under a packet id. When a new session
//! starts empty, everything issued or in flight goes back to the front of the queue in the
//! order it was taken. When the session survives, rumqttc sends the in-flight publishes
//! again itself, and they keep their packet ids here.

use std::collections::{HashMap, VecDeque};

/// What a message is, for counting: readings are the device's data, status messages its
/// birth announcement, which a new session announces afresh rather than replays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Reading,
    Status,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Message {
    /// Order of taking, to restore the order after a lost session.
    pub seq: u64,
    pub kind: Kind,
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

#[derive(Debug)]
pub(crate) struct Outbox {
    queue: VecDeque<Message>,
    issued: VecDeque<Message>,
    in_flight: HashMap<u16, Message>,
    /// Most readings waiting in the queue; beyond it the oldest are dropped.
    capacity: usize,
    /// Most messages issued or in flight at once. Kept below rumqttc's own in-flight limit
    /// and request channel capacity, so that issuing never fails for lack of room.
    window: usize,
    next_seq: u64,
}

impl Outbox {
    pub fn new(capacity: usize, window: usize) -> Outbox {
        Outbox {
            queue: VecDeque::new(),
            issued: VecDeque::new(),
            in_flight: HashMap::new(),
            capacity: capacity.max(1),
            window: window.max(1),
            next_seq: 0,
        }
    }

    fn message(&mut self, kind: Kind, topic: &str, payload: Vec<u8>, retain: bool) -> Message {
        self.next_seq += 1;
        Message {
            seq: self.next_seq,
            kind,
            topic: topic.to_string(),
            payload,
            retain,
        }
    }

    /// Queues a reading; returns how many old readings were dropped to make room.
    pub fn push(&mut self, topic: &str, payload: Vec<u8>) -> u64 {
        let message = self.message(Kind::Reading, topic, payload, false);
        self.queue.push_back(message);
        self.trim()
    }

    fn trim(&mut self) -> u64 {
        let mut dropped = 0;
        while self.queue.len() > self.capacity {
            self.queue.pop_front();
            dropped += 1;
        }
        dropped
    }

    /// Hands queued messages to `send` while the window has room; stops at the first the
    /// sender refuses, which stays at the head of the queue.
    pub fn issue_with(&mut self, mut send: impl FnMut(&Message) -> bool) -> usize {
        let mut issued = 0;
        while self.issued.len() + self.in_flight.len() < self.window {
            let Some(message) = self.queue.pop_front() else {
                break;
            };
            if !send(&message) {
                self.queue.push_front(message);
                break;
            }
            self.issued.push_back(message);
            issued += 1;
        }
        issued
    }

    /// Sends a status message ahead of the queue and outside the window.
    pub fn issue_status(
        &mut self,
        topic: &str,
        payload: &str,
        send: impl FnOnce(&Message) -> bool,
    ) -> bool {
        let message = self.message(Kind::Status, topic, payload.as_bytes().to_vec(), true);
        let sent = send(&message);
        if sent {
            self.issued.push_back(message);
        }
        sent
    }

    /// The client wrote a publish with `pkid`. A packet id already in flight is a resend
    /// within a resumed session; any other belongs to the oldest issued message, because
    /// the client sends in the order it was given.
    pub fn on_sent(&mut self, pkid: u16) {
        if self.in_flight.contains_key(&pkid) {
            return;
        }
        if let Some(message) = self.issued.pop_front() {
            self.in_flight.insert(pkid, message);
        }
    }

    /// The broker acknowledged `pkid`; returns the message it delivered.
    pub fn on_acked(&mut self, pkid: u16) -> Option<Message> {
        self.in_flight.remove(&pkid)
    }

    /// A connection was accepted. Without a session the client has dropped everything
    /// issued, so unacknowledged readings go back to the front of the queue, oldest first.
    /// Returns how many readings had to be dropped because the queue overflowed.
    pub fn on_connack(&mut self, session_present: bool) -> u64 {
        if session_present {
            return 0;
        }
        let mut unacked: Vec<Message> = self
            .issued
            .drain(..)
            .chain(self.in_flight.drain().map(|(_, m)| m))
            .filter(|m| m.kind == Kind::Reading)
            .collect();
        unacked.sort_by_key(|m| m.seq);
        for message in unacked.into_iter().rev() {
            self.queue.push_front(message);
        }
        self.trim()
    }

    /// Readings not yet handed to the client.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Messages handed to the client and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.issued.len() + self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(outbox: &mut Outbox) -> Vec<String> {
        let mut seen = Vec::new();
        outbox.issue_with(|m| {
            seen.push(String::from_utf8_lossy(&m.payload).into_owned());
            true
        });
        seen
    }

    fn filled(n: usize, capacity: usize, window: usize) -> Outbox {
        let mut outbox = Outbox::new(capacity, window);
        for i in 0..n {
            outbox.push("t", i.to_string().into_bytes());
        }
        outbox
    }

    #[test]
    fn issues_in_order_within_the_window() {
        let mut outbox = filled(5, 10, 3);
        assert_eq!(payloads(&mut outbox), ["0", "1", "2"]);
        assert!(payloads(&mut outbox).is_empty(), "window full");

        outbox.on_sent(1);
        assert_eq!(outbox.on_acked(1).map(|m| m.payload), Some(b"0".to_vec()));
        assert_eq!(payloads(&mut outbox), ["3"]);
        assert_eq!((outbox.queued(), outbox.unacked()), (1, 3));
    }

    #[test]
    fn a_refused_message_stays_at_the_head() {
        let mut outbox = filled(2, 10, 10);
        assert_eq!(outbox.issue_with(|_| false), 0);
        assert_eq!(payloads(&mut outbox), ["0", "1"]);
    }

    #[test]
    fn full_queue_drops_the_oldest() {
        let mut outbox = filled(3, 3, 10);
        assert_eq!(outbox.push("t", b"3".to_vec()), 1);
        assert_eq!(payloads(&mut outbox), ["1", "2", "3"]);
    }

    #[test]
    fn lost_session_requeues_unacked_readings_in_taking_order() {
        let mut outbox = filled(6, 10, 4);
        payloads(&mut outbox);
        outbox.issue_status("s", "online", |_| true);
        for pkid in [7, 8, 9] {
            outbox.on_sent(pkid);
        }
        outbox.on_acked(8);

        assert_eq!(outbox.on_connack(false), 0);
        assert_eq!(outbox.unacked(), 0);
        // 0 and 2 were in flight, 3 issued, 4 and 5 never left; 1 was acknowledged and the
        // status message is announced afresh by the new session.
        outbox.window = 10;
        assert_eq!(payloads(&mut outbox), ["0", "2", "3", "4", "5"]);
    }

    #[test]
    fn resumed_session_keeps_in_flight_ids_and_ignores_resends() {
        let mut outbox = filled(3, 10, 10);
        payloads(&mut outbox);
        outbox.on_sent(1);
        outbox.on_sent(2);
        assert_eq!(outbox.on_connack(true), 0);

        // rumqttc resends 1 and 2 with their ids, then sends the third message fresh.
        outbox.on_sent(1);
        outbox.on_sent(2);
        outbox.on_sent(3);
        let acked: Vec<_> = [1, 2, 3]
            .iter()
            .filter_map(|&p| outbox.on_acked(p))
            .collect();
        let acked: Vec<_> = acked.iter().map(|m| m.payload.clone()).collect();
        assert_eq!(acked, [b"0".to_vec(), b"1".to_vec(), b"2".to_vec()]);
        assert_eq!(outbox.unacked(), 0);
    }

    #[test]
    fn requeued_readings_respect_the_capacity() {
        let mut outbox = filled(4, 4, 2);
        payloads(&mut outbox);
        outbox.on_sent(1);
        outbox.push("t", b"4".to_vec());
        outbox.push("t", b"5".to_vec());
        assert_eq!(outbox.on_connack(false), 2);
        outbox.window = 10;
        assert_eq!(payloads(&mut outbox), ["2", "3", "4", "5"]);
    }
}
