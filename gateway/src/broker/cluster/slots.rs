//! Where each channel lives in a Redis Cluster: the key → slot function (CRC16/XMODEM
//! modulo 16384, hash tags honoured) and this node's own slot map, read with
//! `CLUSTER SHARDS`. redis-rs keeps its map private and refreshes it only on errors;
//! the subscriber needs one it can refresh when a slot moves, and patch from a `MOVED`.

use std::collections::BTreeSet;

/// Slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// CRC16/XMODEM (polynomial 0x1021, initial value 0), as Redis Cluster uses it.
fn crc16(data: &[u8]) -> u16 {
    let mut crc = 0u16;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// The slot of `key`: only the part between the first `{` and the next `}` counts when
/// that part is not empty (a hash tag), so `fanout:history:{news}` shares `news`'s slot.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

/// Which master serves each slot, by address (`host:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    masters: Vec<String>,
    /// Index into `masters` per slot; `u16::MAX` for a slot no master serves.
    owner: Vec<u16>,
}

const NOBODY: u16 = u16::MAX;

impl SlotMap {
    /// A map from `(first slot, last slot, master address)` ranges.
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u16, u16, String)>) -> Self {
        let mut map = Self { masters: Vec::new(), owner: vec![NOBODY; SLOTS as usize] };
        for (start, end, addr) in ranges {
            let i = map.index_of(addr);
            for s in start..=end.min(SLOTS - 1) {
                map.owner[s as usize] = i;
            }
        }
        map
    }

    fn index_of(&mut self, addr: String) -> u16 {
        match self.masters.iter().position(|m| *m == addr) {
            Some(i) => i as u16,
            None => {
                self.masters.push(addr);
                (self.masters.len() - 1) as u16
            }
        }
    }

    /// The master serving `slot`, if the map knows one.
    pub fn owner(&self, slot: u16) -> Option<&str> {
        let i = *self.owner.get(slot as usize)?;
        self.masters.get(i as usize).map(String::as_str)
    }

    /// Every master that serves at least one slot.
    pub fn masters(&self) -> BTreeSet<&str> {
        let mut used = vec![false; self.masters.len()];
        for &i in &self.owner {
            if i != NOBODY {
                used[i as usize] = true;
            }
        }
        self.masters.iter().zip(used).filter(|(_, u)| *u).map(|(m, _)| m.as_str()).collect()
    }

    /// Records what a `MOVED <slot> <addr>` said: `slot` now lives at `addr`.
    pub fn moved(&mut self, slot: u16, addr: &str) {
        if slot < SLOTS {
            let i = self.index_of(addr.to_owned());
            self.owner[slot as usize] = i;
        }
    }

    /// Forgets who serves `slot` (its master said it no longer does), until a map read
    /// afterwards or a `MOVED` says.
    pub fn forget(&mut self, slot: u16) {
        if let Some(owner) = self.owner.get_mut(slot as usize) {
            *owner = NOBODY;
        }
    }

    /// Whether every slot has a master.
    pub fn covers_all(&self) -> bool {
        self.owner.iter().all(|&i| i != NOBODY)
    }
}

/// Reads the slot map from the node behind `conn` with `CLUSTER SHARDS` (Redis 7+):
/// per shard its slot ranges and its nodes; the shard's master is the node with
/// role `master` (an `online` one when there are several, as during a failover).
pub async fn fetch(conn: &mut impl redis::aio::ConnectionLike) -> redis::RedisResult<SlotMap> {
    let reply: redis::Value = redis::cmd("CLUSTER").arg("SHARDS").query_async(conn).await?;
    parse_shards(&reply)
        .ok_or_else(|| redis::RedisError::from((redis::ErrorKind::Parse, "unexpected CLUSTER SHARDS reply")))
}

/// The key/value pairs of a RESP2 flat array or a RESP3 map.
fn pairs(v: &redis::Value) -> Option<Vec<(&str, &redis::Value)>> {
    match v {
        redis::Value::Map(kv) => kv.iter().map(|(k, v)| Some((text(k)?, v))).collect(),
        redis::Value::Array(items) => {
            items.chunks(2).map(|kv| Some((text(kv.first()?)?, kv.get(1)?))).collect()
        }
        _ => None,
    }
}

fn text(v: &redis::Value) -> Option<&str> {
    match v {
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok(),
        redis::Value::SimpleString(s) => Some(s),
        redis::Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

fn int(v: &redis::Value) -> Option<i64> {
    match v {
        redis::Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

fn parse_shards(reply: &redis::Value) -> Option<SlotMap> {
    let redis::Value::Array(shards) = reply else { return None };
    let mut ranges = Vec::new();
    for shard in shards {
        let fields = pairs(shard)?;
        let get = |name: &str| fields.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        let redis::Value::Array(slots) = get("slots")? else { return None };
        let redis::Value::Array(nodes) = get("nodes")? else { return None };
        let mut master: Option<(String, bool)> = None;
        for node in nodes {
            let node = pairs(node)?;
            let field = |name: &str| node.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
            if field("role").and_then(text) != Some("master") {
                continue;
            }
            let port = field("port").and_then(int).or_else(|| field("tls-port").and_then(int))?;
            let host = field("endpoint")
                .and_then(text)
                .filter(|h| !h.is_empty() && *h != "?")
                .or_else(|| field("ip").and_then(text))?;
            let online = field("health").and_then(text) == Some("online");
            if master.as_ref().is_none_or(|(_, was_online)| online && !was_online) {
                master = Some((format!("{host}:{port}"), online));
            }
        }
        let Some((addr, _)) = master else { continue };
        for pair in slots.chunks(2) {
            let start = u16::try_from(int(pair.first()?)?).ok()?;
            let end = u16::try_from(int(pair.get(1)?)?).ok()?;
            ranges.push((start, end, addr.clone()));
        }
    }
    Some(SlotMap::from_ranges(ranges))
}

#[cfg(test)]
mod tests {
    use redis::cluster_routing::Slot;

    use super::*;

    #[test]
    fn slots_agree_with_redis_rs() {
        let mut keys: Vec<String> = [
            "",
            "news",
            "a",
            "foo",
            "{user1000}.following",
            "fanout:history:{news}",
            "x{}y",
            "{}{a}",
            "{a",
            "a}{",
        ]
        .map(String::from)
        .to_vec();
        keys.extend((0..2000).map(|i| format!("ch-{i}-{}", i * 7919)));
        for k in &keys {
            let ours = slot(k.as_bytes());
            assert_eq!(Slot::for_key(k.as_bytes()), Slot::new(ours).unwrap(), "slot of {k:?}");
        }
        // Known values from the Redis Cluster specification.
        assert_eq!(slot(b"123456789"), 0x31C3 % SLOTS);
        assert_eq!(slot(b"fanout:history:{news}"), slot(b"news"));
    }

    #[test]
    fn shards_reply_in_both_protocols() {
        let bulk = |s: &str| redis::Value::BulkString(s.as_bytes().to_vec());
        let node = |ip: &str, port: i64, role: &str, health: &str| {
            redis::Value::Array(vec![
                bulk("id"),
                bulk("abc"),
                bulk("port"),
                redis::Value::Int(port),
                bulk("ip"),
                bulk(ip),
                bulk("endpoint"),
                bulk(ip),
                bulk("role"),
                bulk(role),
                bulk("health"),
                bulk(health),
            ])
        };
        let shard = |slots: Vec<i64>, nodes: Vec<redis::Value>| {
            redis::Value::Array(vec![
                bulk("slots"),
                redis::Value::Array(slots.into_iter().map(redis::Value::Int).collect()),
                bulk("nodes"),
                redis::Value::Array(nodes),
            ])
        };
        let reply = redis::Value::Array(vec![
            shard(
                vec![0, 8000],
                vec![node("10.0.0.1", 7000, "master", "online"), node("10.0.0.4", 7003, "replica", "online")],
            ),
            shard(
                vec![8001, 9000, 9001, 16383],
                vec![node("10.0.0.2", 7001, "master", "failed"), node("10.0.0.5", 7004, "master", "online")],
            ),
        ]);
        let map = parse_shards(&reply).unwrap();
        assert_eq!(map.owner(0), Some("10.0.0.1:7000"));
        assert_eq!(map.owner(8000), Some("10.0.0.1:7000"));
        assert_eq!(map.owner(8001), Some("10.0.0.5:7004"), "the online master wins");
        assert_eq!(map.owner(16383), Some("10.0.0.5:7004"));
        assert!(map.covers_all());
        assert_eq!(map.masters().len(), 2);
        let mut moved = map.clone();
        moved.moved(5, "10.0.0.9:7009");
        assert_eq!(moved.owner(5), Some("10.0.0.9:7009"));
        assert_eq!(moved.masters().len(), 3);
    }
}
