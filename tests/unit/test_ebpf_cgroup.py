"""Finding the cgroup2 root the socket programs attach to."""

from __future__ import annotations

import pytest

from podnet.ebpf.cgroup import CgroupError, cgroup2_mounts, cgroup2_root

HYBRID = """\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
40 30 0:27 /kubepods /var/lib/x rw - cgroup2 cgroup2 rw
"""


def test_the_cgroup2_root_of_a_hybrid_host_is_found_and_a_subtree_mount_is_not(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(HYBRID)
    assert cgroup2_mounts(str(info)) == ["/sys/fs/cgroup/unified"]
    assert cgroup2_root(mountinfo=str(info)) == "/sys/fs/cgroup/unified"


def test_a_cgroup_root_option_is_checked_to_be_on_cgroup2(tmp_path):
    info = tmp_path / "mountinfo"
    group = tmp_path / "grp"
    group.mkdir()
    info.write_text(HYBRID + f"50 30 0:29 / {tmp_path} rw - tmpfs tmpfs rw\n")
    with pytest.raises(CgroupError, match=f"--cgroup-root {group}: not a cgroup2 directory \\(on tmpfs\\)"):
        cgroup2_root(str(group), str(info))
    info.write_text(HYBRID + f"50 30 0:27 / {tmp_path} rw - cgroup2 cgroup2 rw\n")  # a cgroup2 mount there
    assert cgroup2_root(str(group), str(info)) == str(group)  # a cgroup below the root: fine
