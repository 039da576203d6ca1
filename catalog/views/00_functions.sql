-- Shared SQL functions of the analytics views.
--
-- wilson_low(k, n) / wilson_high(k, n): bounds of the Wilson score interval
-- (95% by default, z = 1.96) of a proportion of k events in n trials; NULL
-- when n = 0. Unlike the normal approximation it stays within [0, 1] and is
-- usable for small n and for k = 0 or k = n.
CREATE MACRO wilson_low(k, n, z := 1.959963984540054) AS
    CASE WHEN n > 0 THEN greatest(0.0,
        (k::DOUBLE / n + z * z / (2 * n)
         - z * sqrt((k::DOUBLE / n) * (1 - k::DOUBLE / n) / n + z * z / (4 * n * n)))
        / (1 + z * z / n))
    END;

CREATE MACRO wilson_high(k, n, z := 1.959963984540054) AS
    CASE WHEN n > 0 THEN least(1.0,
        (k::DOUBLE / n + z * z / (2 * n)
         + z * sqrt((k::DOUBLE / n) * (1 - k::DOUBLE / n) / n + z * z / (4 * n * n)))
        / (1 + z * z / n))
    END;

-- is_secondary_capture(sop_class): the Secondary Capture storage classes
-- (1.2.840.10008.5.1.4.1.1.7 and its multi-frame variants .7.1 to .7.4).
CREATE MACRO is_secondary_capture(sop_class) AS
    sop_class = '1.2.840.10008.5.1.4.1.1.7' OR sop_class LIKE '1.2.840.10008.5.1.4.1.1.7.%';
