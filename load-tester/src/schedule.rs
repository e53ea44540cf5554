//! The open-loop timetable: when each message of each device is due.
//!
//! A closed-loop tester sends the next message when the previous one returns, so a slow broker
//! quietly lowers the load and the slow periods drop out of the latency figures ("coordinated
//! omission"). Here every message has a due time fixed before the run starts; the sender only
//! ever waits for that time, never for the broker, and latencies are measured from the due time.
//!
//! Device `g` (0-based across the fleet of `n`) sends message `k` at
//! `(s_g + k + g / n) / rate` seconds after the start, where `s_g` is its ramp-up delay rounded
//! down to whole periods. The `g / n` term staggers the devices evenly across one period, so a
//! fleet at 200 msg/s per device produces a steady stream rather than a burst of `n` messages
//! every 5 ms; rounding the ramp-up delay to whole periods keeps that stagger once every device
//! has started.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

/// The whole fleet's timetable. Cheap to copy; every sender holds its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Messages per device per second, above 0.
    rate: f64,
    /// Devices start spread over this many seconds.
    ramp_up_s: f64,
    /// Devices in the fleet, at least 1.
    devices: u64,
    /// Messages per device.
    messages: u64,
}

impl Schedule {
    /// `rate` is messages per device per second and must be above 0; `devices` at least 1.
    pub fn new(rate: f64, ramp_up: Duration, devices: u64, messages: u64) -> Schedule {
        assert!(
            rate.is_finite() && rate > 0.0,
            "rate must be above 0, got {rate}"
        );
        assert!(devices > 0, "a schedule needs at least one device");
        Schedule {
            rate,
            ramp_up_s: ramp_up.as_secs_f64(),
            devices,
            messages,
        }
    }

    pub fn messages_per_device(&self) -> u64 {
        self.messages
    }

    /// Whole periods device `device` waits before its first message.
    fn start_periods(&self, device: u64) -> f64 {
        (self.ramp_up_s * device as f64 / self.devices as f64 * self.rate).floor()
    }

    /// When message `k` of fleet device `device` is due, counted from the start of the run.
    pub fn due(&self, device: u64, k: u64) -> Duration {
        let phase = device as f64 / self.devices as f64;
        Duration::from_secs_f64((self.start_periods(device) + k as f64 + phase) / self.rate)
    }

    /// When the fleet's last message is due.
    pub fn last_due(&self) -> Duration {
        // Both the ramp-up delay and the stagger grow with the device index.
        match self.messages {
            0 => Duration::ZERO,
            m => self.due(self.devices - 1, m - 1),
        }
    }

    /// The messages of some of the fleet's devices (by fleet index) in due order.
    pub fn timetable(&self, devices: Vec<u64>) -> Timetable {
        let mut heap = BinaryHeap::with_capacity(devices.len());
        if self.messages > 0 {
            for (local, &g) in devices.iter().enumerate() {
                heap.push(Reverse((self.due(g, 0), local, 0)));
            }
        }
        Timetable {
            schedule: *self,
            devices,
            heap,
        }
    }
}

/// One message on the timetable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Index into the device list the timetable was built from.
    pub local: usize,
    /// The device's index in the fleet: the entry at `local` of that list.
    pub device: u64,
    /// The device's message number, from 0.
    pub k: u64,
    /// When it is due, from the start of the run.
    pub due: Duration,
}

/// Iterates the messages of a set of devices in due order. Memory is one entry per device,
/// whatever the number of messages.
#[derive(Debug)]
pub struct Timetable {
    schedule: Schedule,
    devices: Vec<u64>,
    /// Next message of each device, earliest first; ties go to the lower local index.
    heap: BinaryHeap<Reverse<(Duration, usize, u64)>>,
}

impl Iterator for Timetable {
    type Item = Slot;

    fn next(&mut self) -> Option<Slot> {
        let Reverse((due, local, k)) = self.heap.pop()?;
        let device = self.devices[local];
        if k + 1 < self.schedule.messages {
            let next = self.schedule.due(device, k + 1);
            self.heap.push(Reverse((next, local, k + 1)));
        }
        Some(Slot {
            local,
            device,
            k,
            due,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(d: Duration) -> f64 {
        d.as_secs_f64()
    }

    #[test]
    fn each_device_sends_every_period_from_its_own_phase() {
        let schedule = Schedule::new(200.0, Duration::ZERO, 4, 10);
        for g in 0..4 {
            for k in 0..10 {
                let expected = (k as f64 + g as f64 / 4.0) * 0.005;
                assert!(
                    (secs(schedule.due(g, k)) - expected).abs() < 1e-9,
                    "g={g} k={k}"
                );
            }
        }
    }

    #[test]
    fn the_fleet_is_staggered_evenly_across_one_period() {
        let schedule = Schedule::new(25.0, Duration::ZERO, 20, 100);
        let dues: Vec<f64> = schedule
            .timetable((0..20).collect())
            .map(|s| secs(s.due))
            .collect();
        assert_eq!(dues.len(), 2000);
        for pair in dues.windows(2) {
            // 20 devices at 25 msg/s is one message every 2 ms, fleet-wide.
            assert!((pair[1] - pair[0] - 0.002).abs() < 1e-9, "{pair:?}");
        }
    }

    #[test]
    fn ramp_up_delays_later_devices_by_whole_periods() {
        let schedule = Schedule::new(10.0, Duration::from_secs(10), 5, 3);
        let firsts: Vec<f64> = (0..5).map(|g| secs(schedule.due(g, 0))).collect();
        // Starts at 0, 2, 4, 6, 8 s, plus each device's stagger of g/5 of a 100 ms period.
        let expected = [0.0, 2.02, 4.04, 6.06, 8.08];
        for (got, want) in firsts.iter().zip(expected) {
            assert!((got - want).abs() < 1e-9, "{firsts:?}");
        }
        assert!((secs(schedule.last_due()) - (8.08 + 0.2)).abs() < 1e-9);
    }

    #[test]
    fn a_timetable_yields_every_message_once_in_due_order() {
        let schedule = Schedule::new(7.0, Duration::from_millis(900), 6, 50);
        let slots: Vec<Slot> = schedule.timetable(vec![5, 1, 3]).collect();
        assert_eq!(slots.len(), 150);
        assert!(slots.windows(2).all(|w| w[0].due <= w[1].due));
        for (local, device) in [5, 1, 3].into_iter().enumerate() {
            let ks: Vec<u64> = slots
                .iter()
                .filter(|s| s.local == local)
                .inspect(|s| assert_eq!(s.device, device))
                .map(|s| s.k)
                .collect();
            assert_eq!(ks, (0..50).collect::<Vec<_>>());
        }
    }

    #[test]
    fn fractional_rates_space_messages_further_apart() {
        let schedule = Schedule::new(0.5, Duration::ZERO, 1, 3);
        assert_eq!(schedule.due(0, 2), Duration::from_secs(4));
    }
}
