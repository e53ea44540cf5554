//! Distances to a geofence's boundary.
//!
//! Circles use the great-circle (haversine) distance. Polygons are projected onto a plane
//! tangent at the device's position (equirectangular), which is accurate to well under a percent
//! for fences up to a few hundred kilometres across, the size geofences have; longitudes are
//! wrapped, so a fence may straddle the antimeridian.

use crate::rules::{LatLon, Shape};

/// Mean Earth radius (IUGG), in metres.
const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// How far `point` is outside `shape`, in metres: positive outside, negative inside (the
/// distance to the boundary), zero on it.
pub(crate) fn signed_distance_m(shape: &Shape, point: LatLon) -> f64 {
    match shape {
        Shape::Circle { center, radius_m } => haversine_m(*center, point) - radius_m,
        Shape::Polygon(vertices) => polygon_signed_distance_m(vertices, point),
    }
}

pub(crate) fn haversine_m(a: LatLon, b: LatLon) -> f64 {
    let (lat1, lat2) = (a.lat.to_radians(), b.lat.to_radians());
    let dlat = lat2 - lat1;
    let dlon = (b.lon - a.lon).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
}

fn polygon_signed_distance_m(vertices: &[LatLon], point: LatLon) -> f64 {
    // Plane coordinates in metres with the point at the origin.
    let scale_x = point.lat.to_radians().cos() * EARTH_RADIUS_M;
    let project = |v: &LatLon| {
        (
            wrap_degrees(v.lon - point.lon).to_radians() * scale_x,
            (v.lat - point.lat).to_radians() * EARTH_RADIUS_M,
        )
    };
    let projected: Vec<(f64, f64)> = vertices.iter().map(project).collect();
    let mut inside = false;
    let mut nearest = f64::INFINITY;
    for (i, &a) in projected.iter().enumerate() {
        let b = projected[(i + 1) % projected.len()];
        // Ray cast along +x from the origin: count the edges that cross it.
        if (a.1 > 0.0) != (b.1 > 0.0) {
            let x = a.0 + (0.0 - a.1) * (b.0 - a.0) / (b.1 - a.1);
            if x > 0.0 {
                inside = !inside;
            }
        }
        nearest = nearest.min(distance_to_segment(a, b));
    }
    if inside {
        -nearest
    } else {
        nearest
    }
}

/// Distance from the origin to the segment `a`-`b`.
fn distance_to_segment(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let length2 = dx * dx + dy * dy;
    let t = if length2 == 0.0 {
        0.0
    } else {
        (-(a.0 * dx + a.1 * dy) / length2).clamp(0.0, 1.0)
    };
    let (x, y) = (a.0 + t * dx, a.1 + t * dy);
    x.hypot(y)
}

/// Maps a longitude difference into -180..180.
fn wrap_degrees(degrees: f64) -> f64 {
    let wrapped = (degrees + 180.0).rem_euclid(360.0) - 180.0;
    if wrapped == -180.0 {
        180.0
    } else {
        wrapped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lat: f64, lon: f64) -> LatLon {
        LatLon { lat, lon }
    }

    #[test]
    fn haversine_matches_a_known_distance() {
        // A quarter of the equator is a quarter of the circumference: pi/2 * R.
        let d = haversine_m(at(0.0, 0.0), at(0.0, 90.0));
        assert!((d - 10_007_557.0).abs() < 1.0, "{d}");
        // The pole is as far from the equator.
        let d = haversine_m(at(0.0, 30.0), at(90.0, 0.0));
        assert!((d - 10_007_557.0).abs() < 1.0, "{d}");
        // One degree of latitude is about 111.2 km.
        let d = haversine_m(at(0.0, 10.0), at(1.0, 10.0));
        assert!((d - 111_195.0).abs() < 10.0, "{d}");
    }

    #[test]
    fn a_circle_is_negative_inside_and_positive_outside() {
        let circle = Shape::Circle {
            center: at(52.0, 5.0),
            radius_m: 1_000.0,
        };
        let inside = signed_distance_m(&circle, at(52.0, 5.0));
        assert!((inside + 1_000.0).abs() < 1e-6, "{inside}");
        // 0.018 degrees of latitude is about 2 km.
        let outside = signed_distance_m(&circle, at(52.018, 5.0));
        assert!((outside - 1_001.5).abs() < 5.0, "{outside}");
    }

    #[test]
    fn a_polygon_gives_the_distance_to_its_nearest_edge() {
        // A square about 2.2 km a side around (0.01, 0.01) on the equator.
        let square = Shape::Polygon(vec![
            at(0.0, 0.0),
            at(0.0, 0.02),
            at(0.02, 0.02),
            at(0.02, 0.0),
        ]);
        let centre = signed_distance_m(&square, at(0.01, 0.01));
        assert!((centre + 1_112.0).abs() < 5.0, "{centre}");
        let near_edge = signed_distance_m(&square, at(0.019, 0.01));
        assert!((near_edge + 111.2).abs() < 1.0, "{near_edge}");
        let outside = signed_distance_m(&square, at(0.03, 0.01));
        assert!((outside - 1_112.0).abs() < 5.0, "{outside}");
        // Beyond a corner the nearest point is the corner itself.
        let corner = signed_distance_m(&square, at(0.03, 0.03));
        assert!((corner - 1_572.5).abs() < 5.0, "{corner}");
    }

    #[test]
    fn a_concave_polygon_excludes_its_notch() {
        // A "U": the notch between the arms is outside.
        let u = Shape::Polygon(vec![
            at(0.0, 0.0),
            at(0.0, 3.0),
            at(3.0, 3.0),
            at(3.0, 2.0),
            at(1.0, 2.0),
            at(1.0, 1.0),
            at(3.0, 1.0),
            at(3.0, 0.0),
        ]);
        assert!(signed_distance_m(&u, at(2.0, 1.5)) > 0.0);
        assert!(signed_distance_m(&u, at(2.0, 0.5)) < 0.0);
        assert!(signed_distance_m(&u, at(0.5, 1.5)) < 0.0);
    }

    #[test]
    fn a_polygon_may_straddle_the_antimeridian() {
        let fiji = Shape::Polygon(vec![
            at(-16.0, 179.0),
            at(-16.0, -179.0),
            at(-18.0, -179.0),
            at(-18.0, 179.0),
        ]);
        assert!(signed_distance_m(&fiji, at(-17.0, 180.0)) < 0.0);
        assert!(signed_distance_m(&fiji, at(-17.0, -179.5)) < 0.0);
        assert!(signed_distance_m(&fiji, at(-17.0, 178.0)) > 0.0);
    }
}
