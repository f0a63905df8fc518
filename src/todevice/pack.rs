//! Packing remote recipients into `m.direct_to_device` EDUs (SPEC §2.5):
//! canonical JSON assembled from pre-encoded pieces, at most `MAX_EDU_BYTES`
//! per EDU, whole users while they fit, a user too big for one EDU split by
//! device, a fresh `message_id` per EDU. Pure: no store, no I/O.

use crate::store::NewOutboxEdu;

use super::{MAX_EDU_BYTES, MESSAGE_ID_LEN, SendRejected, new_message_id};

/// One remote recipient user with its device messages, pre-encoded.
#[derive(Debug)]
pub(super) struct RemoteUser {
    pub(super) user_id: String,
    /// The user ID as a JSON string literal.
    pub(super) key_json: String,
    pub(super) devices: Vec<RemoteDevice>,
}

#[derive(Debug)]
pub(super) struct RemoteDevice {
    pub(super) device_id: String,
    /// The device ID (or `*`) as a JSON string literal.
    pub(super) key_json: String,
    /// The content as canonical JSON.
    pub(super) content: Vec<u8>,
}

impl RemoteDevice {
    /// `"device":content`
    fn entry_len(&self) -> usize {
        self.key_json.len() + 1 + self.content.len()
    }
}

impl RemoteUser {
    /// `"user":{"d1":c1,"d2":c2}`
    fn entry_len(&self) -> usize {
        let devices: usize = self.devices.iter().map(RemoteDevice::entry_len).sum();
        self.key_json.len() + 2 + devices + self.devices.len().saturating_sub(1) + 1
    }
}

/// A string as a JSON string literal (serde_json's escaping is the
/// canonical one, SPEC §3.2).
pub(super) fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("serializing a str cannot fail")
}

/// Assembles canonical `m.direct_to_device` EDUs for one destination, each at
/// most `MAX_EDU_BYTES`: whole users while they fit, a user too big for one
/// EDU split over several by device. Each EDU gets a fresh `message_id`.
pub(super) fn pack_edus(
    destination: &str,
    sender_json: &str,
    type_json: &str,
    users: &[RemoteUser],
) -> Result<Vec<NewOutboxEdu>, SendRejected> {
    let mut packer = Packer::new(destination, sender_json, type_json);
    for user in users {
        packer.add_user(user)?;
    }
    packer.flush();
    Ok(packer.out)
}

/// Builds EDU texts by appending pre-encoded pieces. Key order in the output
/// is canonical: `content` < `edu_type`; `message_id` < `messages` <
/// `sender` < `type`; users and devices arrive sorted (BTreeMap order).
struct Packer<'a> {
    destination: &'a str,
    /// Everything after the users: closes `messages`, then `sender`, `type`,
    /// `edu_type`.
    suffix: String,
    buf: String,
    users_in_buf: usize,
    messages_in_buf: u32,
    out: Vec<NewOutboxEdu>,
}

const EDU_PREFIX_HEAD: &str = "{\"content\":{\"message_id\":\"";
const EDU_PREFIX_TAIL: &str = "\",\"messages\":{";

impl<'a> Packer<'a> {
    fn new(destination: &'a str, sender_json: &str, type_json: &str) -> Self {
        let suffix = format!(
            "}},\"sender\":{sender_json},\"type\":{type_json}}},\"edu_type\":\"m.direct_to_device\"}}"
        );
        let mut packer = Packer {
            destination,
            suffix,
            buf: String::with_capacity(1024),
            users_in_buf: 0,
            messages_in_buf: 0,
            out: Vec::new(),
        };
        packer.start();
        packer
    }

    fn start(&mut self) {
        self.buf.clear();
        self.buf.push_str(EDU_PREFIX_HEAD);
        self.buf.push_str(&new_message_id());
        self.buf.push_str(EDU_PREFIX_TAIL);
        self.users_in_buf = 0;
        self.messages_in_buf = 0;
    }

    /// Bytes still free in the current EDU.
    fn room(&self) -> usize {
        MAX_EDU_BYTES.saturating_sub(self.buf.len() + self.suffix.len())
    }

    /// Bytes free in an EDU with no users yet.
    fn empty_room(&self) -> usize {
        MAX_EDU_BYTES.saturating_sub(
            EDU_PREFIX_HEAD.len() + MESSAGE_ID_LEN + EDU_PREFIX_TAIL.len() + self.suffix.len(),
        )
    }

    /// Finishes the current EDU (if it carries anything) and starts another.
    fn flush(&mut self) {
        if self.messages_in_buf > 0 {
            self.buf.push_str(&self.suffix);
            let edu_json = std::mem::replace(&mut self.buf, String::with_capacity(1024));
            self.out.push(NewOutboxEdu {
                destination: self.destination.to_owned(),
                edu_json,
                message_count: self.messages_in_buf,
            });
        }
        self.start();
    }

    fn add_user(&mut self, user: &RemoteUser) -> Result<(), SendRejected> {
        let whole = user.entry_len();
        let comma = usize::from(self.users_in_buf > 0);
        if comma + whole <= self.room() {
            self.write_whole_user(user);
            return Ok(());
        }
        if self.users_in_buf > 0 && whole <= self.empty_room() {
            self.flush();
            self.write_whole_user(user);
            return Ok(());
        }
        // Too big for one EDU: spread its devices over as many as needed,
        // starting in the space left in the current one.
        let mut open_devices = 0usize;
        for device in &user.devices {
            loop {
                let need = if open_devices > 0 {
                    1 + device.entry_len() + 1
                } else {
                    usize::from(self.users_in_buf > 0)
                        + user.key_json.len()
                        + 2
                        + device.entry_len()
                        + 1
                };
                if need <= self.room() {
                    if open_devices == 0 {
                        self.open_user(user);
                    } else {
                        self.buf.push(',');
                    }
                    self.write_device(device);
                    open_devices += 1;
                    break;
                }
                if open_devices > 0 {
                    self.buf.push('}');
                    open_devices = 0;
                    self.flush();
                } else if self.messages_in_buf > 0 {
                    self.flush();
                } else {
                    // Alone in an empty EDU and still too big.
                    return Err(SendRejected::TooLarge {
                        user_id: user.user_id.clone(),
                        device_id: device.device_id.clone(),
                        bytes: need + MAX_EDU_BYTES - self.room(),
                        limit: MAX_EDU_BYTES,
                    });
                }
            }
        }
        if open_devices > 0 {
            self.buf.push('}');
        }
        Ok(())
    }

    fn open_user(&mut self, user: &RemoteUser) {
        if self.users_in_buf > 0 {
            self.buf.push(',');
        }
        self.buf.push_str(&user.key_json);
        self.buf.push_str(":{");
        self.users_in_buf += 1;
    }

    fn write_whole_user(&mut self, user: &RemoteUser) {
        self.open_user(user);
        for (i, device) in user.devices.iter().enumerate() {
            if i > 0 {
                self.buf.push(',');
            }
            self.write_device(device);
        }
        self.buf.push('}');
    }

    fn write_device(&mut self, device: &RemoteDevice) {
        self.buf.push_str(&device.key_json);
        self.buf.push(':');
        // Canonical JSON is UTF-8 by construction.
        self.buf.push_str(
            std::str::from_utf8(&device.content).expect("the canonical JSON encoder writes UTF-8"),
        );
        self.messages_in_buf += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// A remote user as `split_recipients` builds it (devices sorted).
    fn remote_user(user_id: &str, devices: &[(&str, Value)]) -> RemoteUser {
        let mut devices = devices.to_vec();
        devices.sort_by(|a, b| a.0.cmp(b.0));
        RemoteUser {
            user_id: user_id.to_owned(),
            key_json: json_string(user_id),
            devices: devices
                .iter()
                .map(|(d, c)| RemoteDevice {
                    device_id: (*d).to_owned(),
                    key_json: json_string(d),
                    content: serde_json::to_vec(c).expect("json"),
                })
                .collect(),
        }
    }

    /// Every (user, device) → content in a set of EDUs, checking the EDU
    /// envelope on the way.
    fn unpack(edus: &[NewOutboxEdu]) -> Vec<(String, String, Value)> {
        let mut all = Vec::new();
        let mut ids = std::collections::BTreeSet::new();
        for edu in edus {
            assert!(
                edu.edu_json.len() <= MAX_EDU_BYTES,
                "{}",
                edu.edu_json.len()
            );
            let value: Value = serde_json::from_str(&edu.edu_json).expect("valid JSON");
            // Assembled text equals serde_json's sorted, compact encoding.
            assert_eq!(serde_json::to_string(&value).expect("json"), edu.edu_json);
            assert_eq!(value["edu_type"], "m.direct_to_device");
            assert_eq!(value["content"]["sender"], "@s:here");
            assert_eq!(value["content"]["type"], "m.test");
            let id = value["content"]["message_id"].as_str().expect("id");
            assert_eq!(id.len(), 16);
            assert!(id.bytes().all(|b| b.is_ascii_alphabetic()));
            assert!(ids.insert(id.to_owned()), "message ids are unique");
            let mut count = 0;
            for (user, devices) in value["content"]["messages"].as_object().expect("obj") {
                for (device, content) in devices.as_object().expect("obj") {
                    all.push((user.clone(), device.clone(), content.clone()));
                    count += 1;
                }
            }
            assert_eq!(edu.message_count, count);
        }
        all
    }

    fn pack(users: &[RemoteUser]) -> Vec<NewOutboxEdu> {
        pack_edus(
            "there",
            &json_string("@s:here"),
            &json_string("m.test"),
            users,
        )
        .expect("packs")
    }

    #[test]
    fn small_fan_out_is_one_edu() {
        let users = vec![
            remote_user(
                "@a:there",
                &[("A1", json!({"k": 1})), ("*", json!({"k": 2}))],
            ),
            remote_user("@b:there", &[("B1", json!({"k": "é\n\"/"}))]),
        ];
        let edus = pack(&users);
        assert_eq!(edus.len(), 1);
        let all = unpack(&edus);
        assert_eq!(all.len(), 3);
        assert!(all.contains(&("@a:there".into(), "*".into(), json!({"k": 2}))));
        assert!(all.contains(&("@b:there".into(), "B1".into(), json!({"k": "é\n\"/"}))));
    }

    #[test]
    fn many_users_split_by_user_within_the_limit() {
        let blob = "x".repeat(10_000);
        let users: Vec<RemoteUser> = (0..20)
            .map(|i| remote_user(&format!("@u{i:02}:there"), &[("D", json!({ "b": blob }))]))
            .collect();
        let edus = pack(&users);
        assert!(edus.len() >= 4, "{} EDUs", edus.len());
        let all = unpack(&edus);
        assert_eq!(all.len(), 20);
        // No user is split when it fits in one EDU.
        for edu in &edus {
            let value: Value = serde_json::from_str(&edu.edu_json).expect("json");
            for (_, devices) in value["content"]["messages"].as_object().expect("obj") {
                assert_eq!(devices.as_object().expect("obj").len(), 1);
            }
        }
    }

    #[test]
    fn a_user_with_many_devices_splits_by_device() {
        let blob = "y".repeat(3_000);
        let devices: Vec<(String, Value)> = (0..60)
            .map(|i| (format!("DEV{i:03}"), json!({ "b": blob })))
            .collect();
        let device_refs: Vec<(&str, Value)> = devices
            .iter()
            .map(|(d, c)| (d.as_str(), c.clone()))
            .collect();
        let users = vec![
            remote_user("@a:there", &[("A", json!({"small": true}))]),
            remote_user("@big:there", &device_refs),
            remote_user("@z:there", &[("Z", json!({}))]),
        ];
        let edus = pack(&users);
        assert!(edus.len() >= 3);
        let all = unpack(&edus);
        assert_eq!(all.len(), 62);
        let mut seen: Vec<(String, String)> =
            all.iter().map(|(u, d, _)| (u.clone(), d.clone())).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 62, "every message exactly once");
    }

    #[test]
    fn exactly_full_edus_stay_within_the_limit() {
        // Sizes around the boundary: every EDU must still be <= the limit.
        for pad in [64_000usize, 65_300, 65_400, 65_430, 65_440] {
            let users: Vec<RemoteUser> = (0..3)
                .map(|i| {
                    remote_user(
                        &format!("@u{i}:there"),
                        &[("D", json!({ "p": "z".repeat(pad / 3) })), ("E", json!({}))],
                    )
                })
                .collect();
            let all = unpack(&pack(&users));
            assert_eq!(all.len(), 6);
        }
    }

    #[test]
    fn a_device_message_too_big_for_any_edu_is_refused() {
        let users = vec![remote_user(
            "@a:there",
            &[("D", json!({ "p": "q".repeat(MAX_EDU_BYTES - 20) }))],
        )];
        let result = pack_edus(
            "there",
            &json_string("@s:here"),
            &json_string("m.test"),
            &users,
        );
        assert!(matches!(result, Err(SendRejected::TooLarge { .. })));
    }
}
