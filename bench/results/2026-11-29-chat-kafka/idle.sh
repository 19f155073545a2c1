pids=$(awk '{print $1":"$2}' $WORK/cluster/state); hz=$(getconf CLK_TCK)
snap() { for p in $pids; do n=${p%%:*}; pid=${p##*:}; awk -v n=$n '{print n, $14+$15}' /proc/$pid/stat; done; }
snap > $WORK/i0; sleep $1; snap > $WORK/i1
join $WORK/i0 $WORK/i1 | awk -v t=$1 -v hz=$hz '{printf "%s %.2f%%\n", $1, ($3-$2)/hz/t*100}'
