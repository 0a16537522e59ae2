//! Membership as stored: who belongs to a conversation, since which event, and the earlier
//! periods of users who left and came back.
//!
//! The rule (PROTOCOL.md): a member receives exactly the events sequenced while it is a member,
//! from its `member_added` (or `group_created`, or the first message of a direct conversation)
//! through its own `member_removed`, for each period of membership. A user's [`MemberRecord`]
//! holds those periods, so "who may read seq N" has one answer whenever it is asked, however
//! far membership has moved on since. Records are changed only by the sequenced commit that
//! writes the membership event ([`MemberRecord::join`], [`MemberRecord::leave`]), and by the
//! caches that replay those events, with the same two functions.

/// Earlier membership periods kept per user and conversation. A user who left and came back
/// more often than this loses read access to the oldest periods (never gains any).
pub const MAX_PAST_PERIODS: usize = 64;

/// One user's membership of one conversation, current or former.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MemberRecord {
    /// Group admins may add and remove members and delete any message.
    #[prost(bool, tag = "1")]
    pub admin: bool,
    /// The seq of the event that made the user a member this time (1 for the founders of a
    /// direct conversation); 0 while the user is not a member.
    #[prost(uint64, tag = "2")]
    pub joined_seq: u64,
    /// Earlier periods of membership, oldest first.
    #[prost(message, repeated, tag = "3")]
    pub past: Vec<MembershipPeriod>,
    /// Whether older periods were forgotten ([`MAX_PAST_PERIODS`]): the oldest kept is then
    /// not the first join, and the history before a first join is not read from it.
    #[prost(bool, tag = "4")]
    pub forgot_first_periods: bool,
}

/// Seqs `from..=through` of a conversation, sequenced while the user was a member.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct MembershipPeriod {
    #[prost(uint64, tag = "1")]
    pub from: u64,
    #[prost(uint64, tag = "2")]
    pub through: u64,
}

impl MemberRecord {
    /// A member since `seq`.
    pub fn joined_at(seq: u64, admin: bool) -> Self {
        Self {
            admin,
            joined_seq: seq,
            ..Self::default()
        }
    }

    /// Whether the user is a member now.
    pub fn is_member(&self) -> bool {
        self.joined_seq > 0
    }

    /// The user becomes a member at `seq` (no change if it is one).
    pub fn join(&mut self, seq: u64, admin: bool) {
        if !self.is_member() {
            self.joined_seq = seq;
            self.admin = admin;
        }
    }

    /// The user stops being a member at `seq`, the seq of its `member_removed` (which it
    /// still receives).
    pub fn leave(&mut self, seq: u64) {
        if self.is_member() {
            self.past.push(MembershipPeriod {
                from: self.joined_seq,
                through: seq,
            });
            if self.past.len() > MAX_PAST_PERIODS {
                self.past.remove(0);
                self.forgot_first_periods = true;
            }
            self.joined_seq = 0;
            self.admin = false;
        }
    }

    /// Every period, oldest first; the current one ends at `u64::MAX`.
    pub fn periods(&self) -> impl Iterator<Item = MembershipPeriod> + '_ {
        let current = self.is_member().then_some(MembershipPeriod {
            from: self.joined_seq,
            through: u64::MAX,
        });
        self.past.iter().copied().chain(current)
    }

    /// Whether the user may read the event at `seq`.
    pub fn sees(&self, seq: u64) -> bool {
        self.periods().any(|p| p.from <= seq && seq <= p.through)
    }

    /// The seq of the last membership event this record reflects.
    pub fn version(&self) -> u64 {
        let last_left = self.past.last().map_or(0, |p| p.through);
        self.joined_seq.max(last_left)
    }

    /// What the user may read, given the events before its first join it may also read
    /// (`history_on_join`) and the conversation's retention floor.
    pub fn visibility(&self, history_on_join: u64, floor: u64) -> Visibility {
        let mut periods: Vec<MembershipPeriod> = self.periods().collect();
        if let Some(first) = periods.first_mut().filter(|_| !self.forgot_first_periods) {
            first.from = first.from.saturating_sub(history_on_join);
        }
        let floor = floor.max(1);
        periods.retain_mut(|p| {
            p.from = p.from.max(floor);
            p.from <= p.through
        });
        Visibility { periods }
    }
}

/// The seqs of a conversation one user may read: disjoint periods, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Visibility {
    periods: Vec<MembershipPeriod>,
}

impl Visibility {
    /// The visibility made of `periods` (disjoint, in order), as [`Visibility::periods`] gave
    /// them: how it crosses the network (`courier-rpc`'s chat service).
    pub fn from_periods(periods: Vec<MembershipPeriod>) -> Self {
        Self { periods }
    }

    /// Its periods, in order.
    pub fn periods(&self) -> &[MembershipPeriod] {
        &self.periods
    }

    /// Whether the user may read the event at `seq`.
    pub fn contains(&self, seq: u64) -> bool {
        self.periods
            .iter()
            .any(|p| p.from <= seq && seq <= p.through)
    }

    /// The last seq the user may read: `u64::MAX` for a member, the seq of its
    /// `member_removed` for a former member, 0 when it may read nothing.
    pub fn last(&self) -> u64 {
        self.periods.last().map_or(0, |p| p.through)
    }

    /// The visible seqs in `after+1..=through`, as ranges `(after', through')` meaning
    /// `after'+1..=through'`, in order.
    pub fn ranges(&self, after: u64, through: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.periods.iter().filter_map(move |p| {
            let start = p.from.max(after.saturating_add(1));
            let end = p.through.min(through);
            (start <= end).then(|| (start - 1, end))
        })
    }
}

/// The value of `("convs", user, conv)`: empty while the user is a member, else the seq of its
/// `member_removed` (a former member may still catch up to it).
pub fn encode_left_seq(left_seq: Option<u64>) -> Vec<u8> {
    left_seq.map_or_else(Vec::new, |seq| seq.to_le_bytes().to_vec())
}

/// A conversation of a user, as listed from `("convs", user)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserConversation {
    pub conversation_id: String,
    /// The seq of the user's `member_removed`, for a conversation it has left.
    pub left_seq: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_follow_joins_and_leaves() {
        let mut record = MemberRecord::joined_at(3, false);
        assert!(record.sees(3) && record.sees(1000) && !record.sees(2));
        record.leave(7);
        assert!(!record.is_member());
        assert!(record.sees(7) && !record.sees(8));
        record.join(12, false);
        assert!(!record.sees(11) && record.sees(12));
        assert_eq!(record.version(), 12);
        record.leave(20);
        assert_eq!(record.version(), 20);
        let visible = record.visibility(0, 1);
        assert_eq!(visible.last(), 20);
        assert_eq!(
            visible.ranges(0, 100).collect::<Vec<_>>(),
            [(2, 7), (11, 20)],
            "3..=7 and 12..=20"
        );
        assert_eq!(
            visible.ranges(5, 15).collect::<Vec<_>>(),
            [(5, 7), (11, 15)]
        );
        assert_eq!(visible.ranges(u64::MAX, u64::MAX).count(), 0);
    }

    #[test]
    fn history_on_join_reaches_back_only_from_the_first_join_and_never_below_the_floor() {
        let mut record = MemberRecord::joined_at(10, false);
        record.leave(12);
        record.join(20, false);
        let visible = record.visibility(5, 1);
        assert!(visible.contains(5) && !visible.contains(4));
        assert!(!visible.contains(15), "nothing of the time away");
        let trimmed = record.visibility(5, 11);
        assert!(!trimmed.contains(10) && trimmed.contains(11));
        assert_eq!(MemberRecord::default().visibility(0, 1).last(), 0);
    }

    #[test]
    fn past_periods_are_bounded() {
        let mut record = MemberRecord::default();
        for i in 0..(MAX_PAST_PERIODS as u64 + 10) {
            record.join(2 * i + 1, false);
            record.leave(2 * i + 2);
        }
        assert_eq!(record.past.len(), MAX_PAST_PERIODS);
        assert!(!record.sees(1), "the oldest periods are forgotten");
    }

    /// The history before a first join widens the first period only: once that one is
    /// forgotten, the oldest kept does not gain what was sequenced before it, while the
    /// user was away.
    #[test]
    fn a_member_who_came_back_often_never_reads_what_was_sent_while_away() {
        let mut record = MemberRecord::default();
        // A member for seqs 100..=110, 200..=210, ...; away in between.
        for i in 1..=MAX_PAST_PERIODS as u64 + 1 {
            record.join(100 * i, false);
            record.leave(100 * i + 10);
        }
        let visible = record.visibility(50, 1);
        assert!(!visible.contains(199), "sent while away");
        assert!(!visible.contains(150));
        assert!(visible.contains(200) && !visible.contains(110));
        let mut first = MemberRecord::default();
        first.join(100, false);
        first.leave(110);
        assert!(
            first.visibility(50, 1).contains(50),
            "history before the first join"
        );
    }
}
