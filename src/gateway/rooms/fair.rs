//! The calls waiting for one room, served round-robin by caller: a client that queues a
//! hundred calls gets its next one answered after at most one of everyone else's, and each
//! client has only a share of the queue, so a few floods cannot keep a member out.

use std::collections::{HashMap, VecDeque};

use super::shares::ClientId;

/// Who queued a call: a socket, or the gateway itself (another node, an operator, a test).
pub(super) type Queuer = Option<ClientId>;

pub(super) struct FairQueue<T> {
    by_queuer: HashMap<Queuer, VecDeque<T>>,
    /// Queuers with calls waiting, in the order they are served.
    turns: VecDeque<Queuer>,
    len: usize,
    per_queuer: usize,
}

impl<T> FairQueue<T> {
    /// A queue where one queuer may have `per_queuer` calls waiting.
    pub fn new(per_queuer: usize) -> FairQueue<T> {
        FairQueue { by_queuer: HashMap::new(), turns: VecDeque::new(), len: 0, per_queuer: per_queuer.max(1) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Queues `item`, or hands it back when its queuer has used its share.
    pub fn push(&mut self, queuer: Queuer, item: T) -> Result<(), T> {
        let waiting = self.by_queuer.entry(queuer).or_default();
        if waiting.len() >= self.per_queuer {
            return Err(item);
        }
        if waiting.is_empty() {
            self.turns.push_back(queuer);
        }
        waiting.push_back(item);
        self.len += 1;
        Ok(())
    }

    /// The next call: the oldest of the queuer whose turn it is.
    pub fn pop(&mut self) -> Option<T> {
        let queuer = self.turns.pop_front()?;
        let waiting = self.by_queuer.get_mut(&queuer)?;
        let item = waiting.pop_front();
        if waiting.is_empty() {
            self.by_queuer.remove(&queuer);
        } else {
            self.turns.push_back(queuer);
        }
        if item.is_some() {
            self.len -= 1;
        }
        item
    }

    /// Everything still waiting, in no particular order.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.turns.clear();
        self.len = 0;
        self.by_queuer.drain().flat_map(|(_, waiting)| waiting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queuers_take_turns_and_keep_their_own_order() {
        let (flood, member) = (Some(ClientId::next()), Some(ClientId::next()));
        let mut queue = FairQueue::new(100);
        for i in 0..5 {
            queue.push(flood, format!("flood {i}")).unwrap();
        }
        queue.push(member, "member".to_owned()).unwrap();
        let order: Vec<String> = std::iter::from_fn(|| queue.pop()).collect();
        assert_eq!(order, ["flood 0", "member", "flood 1", "flood 2", "flood 3", "flood 4"]);
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn a_queuer_past_its_share_is_refused_and_others_are_not() {
        let (flood, member) = (Some(ClientId::next()), None);
        let mut queue = FairQueue::new(2);
        assert!(queue.push(flood, 1).is_ok() && queue.push(flood, 2).is_ok());
        assert_eq!(queue.push(flood, 3), Err(3));
        assert!(queue.push(member, 4).is_ok());
        assert_eq!(queue.pop(), Some(1));
        assert!(queue.push(flood, 5).is_ok(), "a served call frees a place in the share");
        assert_eq!(queue.drain().count(), 3);
        assert_eq!(queue.len(), 0);
    }
}
